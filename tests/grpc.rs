//! A real gRPC client (tonic) through limen: a bidirectional stream echoes message by message,
//! trailing metadata arrives, and the errors limen makes itself reach the client as the gRPC
//! status codes Envoy uses. Two upstreams: the harness's h2c backend, whose `/stream` echoes
//! every DATA frame as it arrives (valid gRPC framing in, the same framing out), and a real tonic
//! server (below), for the four call kinds, statuses with custom messages and trailers, and the
//! metadata the server sees.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

const HOST: &str = "grpc.example.test";

/// Messages as raw bytes: no protobuf, no code generation.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// Dials limen over TLS (ALPN h2) for the channel.
#[derive(Clone)]
struct ViaLimen {
    client: Client,
    addr: SocketAddr,
}

impl tonic::codegen::Service<http::Uri> for ViaLimen {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (client, addr) = (self.client.clone(), self.addr);
        Box::pin(async move {
            client
                .connect(addr, HOST, Proto::H2)
                .await
                .map(TokioIo::new)
        })
    }
}

async fn grpc(pki: &Pki, proxy: &Proxy) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_static("https://grpc.example.test")
        .connect_with_connector(ViaLimen {
            client: Client::new(pki),
            addr: proxy.addr,
        })
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn proxy(pki: &Pki, backend: &H2Backend) -> Proxy {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    Proxy::start(
        pki,
        &[HOST],
        "",
        &format!(
            "  - {{host: \"{HOST}\", path: /stream, upstreams: [\"{0}\"]}}\n  - {{host: \"{HOST}\", path: /sleep, upstreams: [\"{0}\"]}}\n  - {{host: \"{HOST}\", path: /dead, upstreams: [\"h2c://{dead_addr}\"]}}\n  - {{host: \"{HOST}\", path: /slow, strip_prefix: true, timeout: 300ms, upstreams: [\"{0}\"]}}\n",
            backend.url()
        ),
    )
    .await
}

#[tokio::test]
async fn a_bidi_stream_echoes_message_by_message_and_its_trailers_arrive() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let proxy = proxy(&pki, &backend).await;
    let mut grpc = grpc(&pki, &proxy).await;
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(Bytes::from_static(b"message 0")).await.unwrap();
    let resp = grpc
        .streaming(
            Request::new(outgoing),
            PathAndQuery::from_static("/stream/Echo"),
            Raw,
        )
        .await
        .unwrap();
    let mut incoming = resp.into_inner();
    for i in 0..10 {
        let got = tokio::time::timeout(Duration::from_secs(10), incoming.message())
            .await
            .expect("each echo arrives before the next message is sent")
            .unwrap()
            .unwrap();
        assert_eq!(got, format!("message {i}").as_bytes());
        if i < 9 {
            tx.send(Bytes::from(format!("message {}", i + 1)))
                .await
                .unwrap();
        }
    }
    drop(tx);
    assert!(incoming.message().await.unwrap().is_none());
    let trailers = incoming
        .trailers()
        .await
        .unwrap()
        .expect("trailing metadata");
    assert_eq!(trailers.get("x-custom").unwrap(), "yes");
}

/// A gRPC call over HTTP/2 on a route whose upstreams speak HTTP/2 is a stream whose messages
/// may be far apart: its body is held to `timeouts.idle`, not `body_idle`. Messages 700 ms apart
/// under a `body_idle` of 300 ms all echo. (The same label on a route to an `http://` upstream, or
/// over HTTP/1.1, is held to `body_idle`: tests/defences.rs.)
#[tokio::test]
async fn a_grpc_stream_on_an_http2_route_may_pause_longer_than_body_idle() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "timeouts:\n  body_idle: 300ms\n  idle: 30s\n",
        &format!(
            "  - {{host: \"{HOST}\", path: /stream, upstreams: [\"{}\"]}}\n",
            backend.url()
        ),
    )
    .await;
    let mut grpc = grpc(&pki, &proxy).await;
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(Bytes::from_static(b"message 0")).await.unwrap();
    let mut incoming = grpc
        .streaming(Request::new(outgoing), path("/stream/Echo"), Raw)
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(10), incoming.message())
            .await
            .expect("each echo arrives")
            .unwrap()
            .unwrap();
        assert_eq!(got, format!("message {i}").as_bytes());
        // Longer than body_idle between two messages of the client's stream.
        tokio::time::sleep(Duration::from_millis(700)).await;
        tx.send(Bytes::from(format!("message {}", i + 1)))
            .await
            .unwrap();
    }
    let got = incoming.message().await.unwrap().unwrap();
    assert_eq!(got, "message 3".as_bytes());
    drop(tx);
    assert!(incoming.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_unary_call_passes_and_limen_made_errors_are_grpc_statuses() {
    let pki = Pki::new();
    let backend = H2Backend::start().await;
    let proxy = proxy(&pki, &backend).await;
    let mut grpc = grpc(&pki, &proxy).await;

    grpc.ready().await.unwrap();
    let got = grpc
        .unary(
            Request::new(Bytes::from_static(b"hello")),
            PathAndQuery::from_static("/stream/Unary"),
            Raw,
        )
        .await
        .unwrap();
    assert_eq!(got.into_inner(), "hello");

    let call = |path: &'static str, timeout: Option<&'static str>| {
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.unwrap();
            let mut req = Request::new(Bytes::from_static(b"x"));
            if let Some(t) = timeout {
                req.metadata_mut()
                    .insert("grpc-timeout", t.parse().unwrap());
            }
            grpc.unary(req, PathAndQuery::from_static(path), Raw)
                .await
                .unwrap_err()
        }
    };
    assert_eq!(
        call("/nothing/Here", None).await.code(),
        Code::Unimplemented
    );
    assert_eq!(call("/dead/Call", None).await.code(), Code::Unavailable);
    // The route's timeout runs out first (tonic would enforce a grpc-timeout itself, so this one
    // comes from limen; the header's own bound is tested in tests/upstreams.rs).
    let late = call("/slow/sleep/5000", None).await;
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    assert!(
        late.message().contains("did not answer in time"),
        "{late:?}"
    );
}

// ---------------------------------------------------------------- a real gRPC server (tonic)

type Messages = Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, Status>> + Send>>;

/// A unary handler.
struct Unary<F>(F);

impl<F> tonic::server::UnaryService<Bytes> for Unary<F>
where
    F: FnMut(Request<Bytes>) -> Result<tonic::Response<Bytes>, Status>,
{
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        std::future::ready((self.0)(req))
    }
}

/// `Count`: the request is a number n; answers "1".."n", then ends with a status whose trailers
/// carry `x-counted: n`, and a custom message, when n is odd.
struct Count;

impl tonic::server::ServerStreamingService<Bytes> for Count {
    type Response = Bytes;
    type ResponseStream = Messages;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Messages>, Status>> + Send>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let n: usize = std::str::from_utf8(req.get_ref())
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| Status::invalid_argument("not a number"))?;
            let mut items: Vec<Result<Bytes, Status>> =
                (1..=n).map(|i| Ok(Bytes::from(i.to_string()))).collect();
            if n % 2 == 1 {
                let mut trailers = tonic::metadata::MetadataMap::new();
                trailers.insert("x-counted", n.to_string().parse().unwrap());
                items.push(Err(Status::with_metadata(
                    Code::Aborted,
                    "odd count: stopped after the last one ✓",
                    trailers,
                )));
            }
            let out: Messages = Box::pin(futures_util::stream::iter(items));
            Ok(tonic::Response::new(out))
        })
    }
}

/// `Join`: joins every message of the client's stream with `+`.
struct Join;

impl tonic::server::ClientStreamingService<Bytes> for Join {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, req: Request<tonic::Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let mut stream = req.into_inner();
            let mut parts = Vec::new();
            while let Some(m) = stream.message().await? {
                parts.push(String::from_utf8_lossy(&m).into_owned());
            }
            Ok(tonic::Response::new(Bytes::from(parts.join("+"))))
        })
    }
}

/// `Bidi`: echoes each message as it arrives, upper-cased.
struct Bidi;

impl tonic::server::StreamingService<Bytes> for Bidi {
    type Response = Bytes;
    type ResponseStream = Messages;
    type Future = std::future::Ready<Result<tonic::Response<Messages>, Status>>;
    fn call(&mut self, req: Request<tonic::Streaming<Bytes>>) -> Self::Future {
        let out: Messages = Box::pin(futures_util::stream::unfold(
            req.into_inner(),
            |mut s| async move {
                match s.message().await {
                    Ok(Some(m)) => Some((Ok(Bytes::from(m.to_ascii_uppercase())), s)),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), s)),
                }
            },
        ));
        std::future::ready(Ok(tonic::Response::new(out)))
    }
}

/// The metadata a handler saw, as `name=value` lines.
fn seen(req: &Request<Bytes>) -> Bytes {
    let mut lines = Vec::new();
    for name in [
        "te",
        "grpc-timeout",
        "content-type",
        "x-forwarded-proto",
        "x-pool",
    ] {
        let v = req
            .metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        lines.push(format!("{name}={v}"));
    }
    Bytes::from(lines.join("\n"))
}

async fn dispatch(req: http::Request<hyper::body::Incoming>) -> http::Response<tonic::body::Body> {
    let mut grpc = tonic::server::Grpc::new(Raw);
    match req.uri().path() {
        "/echo.Echo/Unary" => {
            grpc.unary(
                Unary(|r: Request<Bytes>| Ok(tonic::Response::new(r.into_inner()))),
                req,
            )
            .await
        }
        "/echo.Echo/Seen" => {
            grpc.unary(
                Unary(|r: Request<Bytes>| Ok(tonic::Response::new(seen(&r)))),
                req,
            )
            .await
        }
        "/echo.Echo/Refuse" => {
            let refuse = |_: Request<Bytes>| {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-reason", "quota".parse().unwrap());
                Err(Status::with_metadata(
                    Code::ResourceExhausted,
                    "quota of 3 calls/s used up; retry in 1s",
                    md,
                ))
            };
            grpc.unary(Unary(refuse), req).await
        }
        "/echo.Echo/Count" => grpc.server_streaming(Count, req).await,
        "/echo.Echo/Join" => grpc.client_streaming(Join, req).await,
        "/echo.Echo/Bidi" => grpc.streaming(Bidi, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    }
}

/// A tonic gRPC server over h2c, with the `echo.Echo` methods above.
struct TonicServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TonicServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TonicServer {
    async fn start() -> TonicServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(|req| async move {
                        Ok::<_, std::convert::Infallible>(dispatch(req).await)
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        TonicServer { addr, task }
    }
}

async fn via_limen_to_tonic(pki: &Pki) -> (TonicServer, Proxy, tonic::client::Grpc<Channel>) {
    let server = TonicServer::start().await;
    let proxy = Proxy::start(
        pki,
        &[HOST],
        "",
        &format!(
            "  - {{host: \"{HOST}\", path: /echo.Echo/, upstreams: [\"h2c://{}\"]}}\n",
            server.addr
        ),
    )
    .await;
    let mut grpc = grpc(pki, &proxy).await;
    grpc.ready().await.unwrap();
    (server, proxy, grpc)
}

/// A gRPC canary: calls carrying `x-canary: true` metadata take the canary route (which marks
/// them `x-pool: canary` on the way), the others the stable one, on one HTTP/2 connection. Both
/// routes have `compress`, and the calls accept gzip and br: gRPC answers are never coded by
/// limen (gRPC compresses per message itself), so every call still decodes.
#[tokio::test]
async fn a_canary_header_picks_the_route_of_each_grpc_call() {
    let pki = Pki::new();
    let server = TonicServer::start().await;
    let proxy = Proxy::start(
        &pki,
        &[HOST],
        "",
        &format!(
            concat!(
                "  - {{host: \"{h}\", path: /echo.Echo/, compress: {{}}, upstreams: [\"h2c://{a}\"], headers: {{request: {{set: {{x-pool: stable}}}}}}}}\n",
                "  - {{host: \"{h}\", path: /echo.Echo/, match: {{headers: {{x-canary: \"true\"}}}}, compress: {{}}, upstreams: [\"h2c://{a}\"], headers: {{request: {{set: {{x-pool: canary}}}}}}}}\n",
            ),
            h = HOST,
            a = server.addr
        ),
    )
    .await;
    let mut grpc = grpc(&pki, &proxy).await;
    for canary in [false, true, false, true] {
        grpc.ready().await.unwrap();
        let mut req = Request::new(Bytes::new());
        if canary {
            req.metadata_mut()
                .insert("x-canary", "true".parse().unwrap());
        }
        let seen = grpc.unary(req, path("/echo.Echo/Seen"), Raw).await.unwrap();
        let seen = String::from_utf8(seen.into_inner().to_vec()).unwrap();
        let pool = if canary { "canary" } else { "stable" };
        assert!(seen.contains(&format!("x-pool={pool}")), "{seen}");
    }
}

fn path(p: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(p)
}

#[tokio::test]
async fn unary_and_streaming_calls_reach_a_tonic_server_with_their_metadata() {
    let pki = Pki::new();
    let (_server, _proxy, mut grpc) = via_limen_to_tonic(&pki).await;

    let got = grpc
        .unary(
            Request::new(Bytes::from_static(b"ping")),
            path("/echo.Echo/Unary"),
            Raw,
        )
        .await
        .unwrap();
    assert_eq!(got.into_inner(), "ping");

    // What the server saw: TE: trailers survived as the one hop-by-hop field gRPC needs, and the
    // client's deadline travelled with the call.
    grpc.ready().await.unwrap();
    let mut req = Request::new(Bytes::new());
    req.set_timeout(Duration::from_secs(30));
    let seen = grpc.unary(req, path("/echo.Echo/Seen"), Raw).await.unwrap();
    let seen = String::from_utf8(seen.into_inner().to_vec()).unwrap();
    assert!(seen.contains("te=trailers"), "{seen}");
    assert!(!seen.contains("grpc-timeout=-"), "{seen}");
    assert!(seen.contains("content-type=application/grpc"), "{seen}");
    assert!(seen.contains("x-forwarded-proto=https"), "{seen}");

    // Server streaming: every message, then a clean end.
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            Request::new(Bytes::from_static(b"4")),
            path("/echo.Echo/Count"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(String::from_utf8(m.to_vec()).unwrap());
    }
    assert_eq!(got, ["1", "2", "3", "4"]);

    // Client streaming: the server answers once the client's stream has ended.
    grpc.ready().await.unwrap();
    let parts = futures_util::stream::iter(
        [b"a", b"b", b"c"].map(|m: &'static [u8; 1]| Bytes::from_static(m)),
    );
    let joined = grpc
        .client_streaming(Request::new(parts), path("/echo.Echo/Join"), Raw)
        .await
        .unwrap();
    assert_eq!(joined.into_inner(), "a+b+c");

    // Bidirectional: each answer comes back before the next message is sent.
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(Bytes::from_static(b"word 0")).await.unwrap();
    let mut incoming = grpc
        .streaming(Request::new(outgoing), path("/echo.Echo/Bidi"), Raw)
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        let got = tokio::time::timeout(Duration::from_secs(10), incoming.message())
            .await
            .expect("each answer arrives before the next message is sent")
            .unwrap()
            .unwrap();
        assert_eq!(got, format!("WORD {i}").as_bytes());
        tx.send(Bytes::from(format!("word {}", i + 1)))
            .await
            .unwrap();
    }
    drop(tx);
    assert_eq!(incoming.message().await.unwrap().unwrap(), "WORD 5");
    assert!(incoming.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_tonic_servers_statuses_reach_the_client_with_message_and_trailers() {
    let pki = Pki::new();
    let (_server, _proxy, mut grpc) = via_limen_to_tonic(&pki).await;

    // Trailers-only: the status, its message and metadata in the one header block.
    let refused = grpc
        .unary(Request::new(Bytes::new()), path("/echo.Echo/Refuse"), Raw)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(refused.message(), "quota of 3 calls/s used up; retry in 1s");
    assert_eq!(refused.metadata().get("x-reason").unwrap(), "quota");

    // After messages: the status comes in real trailers, with a non-ASCII message
    // (percent-encoded on the wire) and custom trailing metadata.
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            Request::new(Bytes::from_static(b"3")),
            path("/echo.Echo/Count"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    for want in ["1", "2", "3"] {
        assert_eq!(stream.message().await.unwrap().unwrap(), want);
    }
    let end = stream.message().await.unwrap_err();
    assert_eq!(end.code(), Code::Aborted, "{end:?}");
    assert_eq!(end.message(), "odd count: stopped after the last one ✓");
    assert_eq!(end.metadata().get("x-counted").unwrap(), "3");

    // The server's own "unimplemented" is passed through as it is.
    grpc.ready().await.unwrap();
    let none = grpc
        .unary(Request::new(Bytes::new()), path("/echo.Echo/Nope"), Raw)
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unimplemented);
    assert_eq!(none.message(), "no such method");
}
