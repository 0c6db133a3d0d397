//! A real gRPC client (tonic) through limen: a bidirectional stream echoes message by message,
//! trailing metadata arrives, and the errors limen makes itself reach the client as the gRPC
//! status codes Envoy uses. The upstream is the harness's h2c backend, whose `/stream` echoes
//! every DATA frame as it arrives (valid gRPC framing in, the same framing out).

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
