//! The library floor of the HTTP/2 rows: the least a proxy built on limen's libraries can spend.
//! rustls (aws-lc-rs) and hyper's server take the client's connection; hyper's client forwards
//! each request as it came: to an HTTP/1.1 upstream over a pool of keep-alive connections, or,
//! under `/h2c/`, multiplexed on one HTTP/2 cleartext connection. Nothing else: no routing, no
//! limits, no timeouts, no header edits, no logs, one thread. The benchmark runs it beside limen
//! (`bench/run.sh --floor`) so the gap between limen and HAProxy splits into what limen adds and
//! what hyper, h2 and rustls cost.
//!
//! `h2_floor LISTEN CERT_PEM KEY_PEM H1_UPSTREAM H2C_UPSTREAM`
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;

type Answer = Response<Either<Incoming, Empty<Bytes>>>;

struct Upstreams {
    h1_addr: SocketAddr,
    h1_idle: Mutex<Vec<http1::SendRequest<Incoming>>>,
    h2c_addr: SocketAddr,
    /// One connection, dialled again when the upstream closes it.
    h2c: tokio::sync::Mutex<http2::SendRequest<Incoming>>,
    h2c_authority: String,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, cert, key, h1, h2c] = args.as_slice() else {
        anyhow::bail!("usage: h2_floor LISTEN CERT_PEM KEY_PEM H1_UPSTREAM H2C_UPSTREAM");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN")?;
    let h1_addr: SocketAddr = h1.parse().context("H1_UPSTREAM")?;
    let h2c_addr: SocketAddr = h2c.parse().context("H2C_UPSTREAM")?;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .context("CERT_PEM")?
        .collect::<Result<Vec<_>, _>>()
        .context("CERT_PEM")?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).context("KEY_PEM")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let h2c = dial_h2c(h2c_addr).await?;
        let ups = Arc::new(Upstreams {
            h1_addr,
            h1_idle: Mutex::new(Vec::new()),
            h2c_addr,
            h2c: tokio::sync::Mutex::new(h2c),
            h2c_authority: h2c_addr.to_string(),
        });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("h2_floor on {listen}");
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let (acceptor, ups) = (acceptor.clone(), ups.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = service_fn(move |req| forward(req, ups.clone()));
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    })
}

async fn forward(
    req: Request<Incoming>,
    ups: Arc<Upstreams>,
) -> Result<Answer, std::convert::Infallible> {
    let answer = if req.uri().path().starts_with("/h2c/") {
        to_h2c(req, &ups).await
    } else {
        to_h1(req, &ups).await
    };
    Ok(match answer {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => {
            let mut r = Response::new(Either::Right(Empty::new()));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r
        }
    })
}

async fn to_h2c(req: Request<Incoming>, ups: &Upstreams) -> anyhow::Result<Response<Incoming>> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(ups.h2c_authority.as_str())
        .path_and_query(path)
        .build()?;
    parts.version = Version::HTTP_2;
    parts.headers.remove(header::HOST);
    let mut sender = {
        let mut current = ups.h2c.lock().await;
        if current.is_closed() {
            *current = dial_h2c(ups.h2c_addr).await?;
        }
        current.clone()
    };
    Ok(sender
        .send_request(Request::from_parts(parts, body))
        .await?)
}

async fn dial_h2c(addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Incoming>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (h2c, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(h2c)
}

async fn to_h1(req: Request<Incoming>, ups: &Upstreams) -> anyhow::Result<Response<Incoming>> {
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts.uri.authority() {
        let host = HeaderValue::from_str(authority.as_str())?;
        parts.headers.insert(header::HOST, host);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    parts.version = Version::HTTP_11;
    let idle = {
        let mut pool = ups.h1_idle.lock().map_err(|_| anyhow::anyhow!("pool"))?;
        let at = pool.iter().position(|s| s.is_ready());
        at.map(|i| pool.swap_remove(i))
    };
    let mut sender = match idle {
        Some(s) => s,
        None => {
            let tcp = tokio::net::TcpStream::connect(ups.h1_addr).await?;
            tcp.set_nodelay(true)?;
            let (s, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            s
        }
    };
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    // Back to the pool at once: it is ready again once this response's body has been read.
    if let Ok(mut pool) = ups.h1_idle.lock() {
        pool.push(sender);
    }
    Ok(resp)
}
