//! The shared test harness: a test CA that issues certificates, backends started by the test, a
//! limen started in-process from a YAML written to a temp dir, and real TLS clients.
#![allow(dead_code)]

pub mod http3;
pub mod raw_h2;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Waits until `check` returns true, polling every 20ms; fails the test at the deadline.
pub async fn eventually<F, Fut>(patience: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + patience;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("not true within {patience:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- certificates

/// A test certificate authority. Clients trust it; certs it issues are written to disk for limen.
pub struct Pki {
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
}

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `NAME.crt` and `NAME.key` (or `tls.crt`/`tls.key` when name is "tls") into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        set_mode(&k, 0o600);
        (c, k)
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Pki {
    pub fn new() -> Pki {
        Pki::named("limen test CA")
    }

    /// A CA with this common name (issuers are found by name: a stranger CA needs its own).
    pub fn named(common_name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            ca_params: params,
            ca_key,
        }
    }

    /// A leaf for `names`, valid from 2020 to 2099.
    pub fn issue(&self, names: &[&str]) -> Issued {
        self.issue_until(names, 2099)
    }

    /// A leaf for `names` that expires on 1 January of `year`.
    pub fn issue_until(&self, names: &[&str], year: i32) -> Issued {
        self.issue_expiring(names, (year, 1, 1))
    }

    /// A leaf for `names` that expires on (year, month, day).
    pub fn issue_expiring(&self, names: &[&str], ymd: (i32, u8, u8)) -> Issued {
        self.issue_with(names, ymd, Vec::new())
    }

    /// A leaf with these extended key usages (none: any use).
    pub fn issue_with(
        &self,
        names: &[&str],
        (year, month, day): (i32, u8, u8),
        ekus: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> Issued {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, month, day);
        params.extended_key_usages = ekus;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("x"),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

// ---------------------------------------------------------------- backends

/// What a backend saw of a request, as it reports it in its JSON answer.
#[derive(Debug, serde::Deserialize)]
pub struct Echo {
    pub backend: String,
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: u64,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A test upstream on 127.0.0.1. Paths:
/// - `/sleep/MS...`: answer after MS milliseconds;
/// - `/bytes/N...`: stream N bytes (with a Content-Length);
/// - `/chunked/N...`: stream N bytes chunked (no Content-Length);
/// - `/stall...`: promise 1000 bytes, send 10, then never more;
/// - `/ws...`: WebSocket echo;
/// - anything else: a JSON `Echo` of the request (the body is read and counted, not kept).
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub requests: Arc<AtomicUsize>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn start(name: &str) -> Backend {
        let listener = backend_listener("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (n, r, c) = (name.to_string(), requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                let (n, r) = (n.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        r.fetch_add(1, Ordering::Relaxed);
                        backend_answer(req, n.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            requests,
            connections,
            task,
        }
    }
}

pub type BackendBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

fn full(b: impl Into<Bytes>) -> BackendBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn number_after(path: &str, prefix: &str) -> u64 {
    path[prefix.len()..]
        .split(['/', '?'])
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn backend_answer(
    mut req: Request<Incoming>,
    name: String,
) -> Result<Response<BackendBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path.starts_with("/ws") {
        return Ok(websocket_echo(&mut req));
    }
    if let Some(resp) = big_header(&path) {
        return Ok(resp);
    }

    if path.starts_with("/sleep/") {
        tokio::time::sleep(Duration::from_millis(number_after(&path, "/sleep/"))).await;
    }
    if path.starts_with("/stall") {
        let stream = futures_util::stream::unfold(0u8, |state| async move {
            if state == 0 {
                return Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"0123456789"))),
                    1,
                ));
            }
            std::future::pending::<()>().await;
            None
        });
        let mut resp = Response::new(StreamBody::new(stream).boxed());
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, 1000u64.into());
        return Ok(resp);
    }
    if path.starts_with("/bytes/") || path.starts_with("/chunked/") {
        let chunked = path.starts_with("/chunked/");
        let total = number_after(&path, if chunked { "/chunked/" } else { "/bytes/" });
        let mut resp = Response::new(streamed_body_of(total, b'x'));
        if !chunked {
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, total.into());
        }
        return Ok(resp);
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let method = req.method().to_string();
    let full_path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut body = req.into_body();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                }
            }
            Err(_) => {
                let mut r = Response::new(full("aborted body"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            }
        }
    }
    let json = serde_json::json!({
        "backend": name, "method": method, "path": full_path, "headers": headers, "body_len": body_len,
    });
    let mut resp = Response::new(full(json.to_string()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-hop", http::HeaderValue::from_static("must-not-pass"));
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("x-hop"),
    );
    Ok(resp)
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<BackendBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut r = Response::new(full("not a websocket request"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_text() || msg.is_binary() {
                if tx.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        "sec-websocket-accept",
        http::HeaderValue::from_str(&accept).unwrap(),
    );
    r
}

// ---------------------------------------------------------------- the proxy

/// A limen running in this process, from a config file in its own temp dir.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub running: Option<limen::server::Running>,
    pub addr: SocketAddr,
}

impl Proxy {
    /// A fresh temp dir with an empty `certs/` folder; write certs there, then `start`.
    pub fn dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        dir
    }

    /// Writes `yaml` as `proxy.yaml` in `dir` and starts limen on it.
    pub async fn start_in(dir: tempfile::TempDir, yaml: &str) -> Proxy {
        let config_path = dir.path().join("proxy.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let running = limen::server::start(&config_path)
            .await
            .unwrap_or_else(|e| panic!("limen did not start: {e}"));
        Proxy {
            addr: running.https_addr,
            dir,
            config_path,
            running: Some(running),
        }
    }

    /// Starts limen with `routes` (YAML list items) and `extra` top-level YAML, serving one
    /// certificate from `pki` for `names`.
    pub async fn start(pki: &Pki, names: &[&str], extra: &str, routes: &str) -> Proxy {
        let dir = Proxy::dir();
        pki.issue(names).write(&dir.path().join("certs"), "site");
        Proxy::start_in(dir, &config_yaml(extra, routes)).await
    }

    pub fn running(&self) -> &limen::server::Running {
        self.running.as_ref().unwrap()
    }

    pub async fn shutdown(&mut self) -> bool {
        self.running.take().unwrap().shutdown().await
    }
}

/// A config with an ephemeral https port, `./certs` as cert dir, `extra` top-level keys and `routes`.
pub fn config_yaml(extra: &str, routes: &str) -> String {
    format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n{extra}\nroutes:\n{routes}\n"
    )
}

// ---------------------------------------------------------------- clients

/// A TLS client that trusts the test CA.
#[derive(Clone)]
pub struct Client {
    pki_root: CertificateDer<'static>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    H1,
    H2,
}

/// What a client got back.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn echo(&self) -> Echo {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {} {}", self.status, self.text()))
    }
}

impl Client {
    pub fn new(pki: &Pki) -> Client {
        Client {
            pki_root: pki.ca_der.clone(),
        }
    }

    pub fn config(&self, proto: Proto) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pki_root.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = match proto {
            Proto::H1 => vec![b"http/1.1".to_vec()],
            Proto::H2 => vec![b"h2".to_vec()],
        };
        Arc::new(cfg)
    }

    /// An HTTP/1.1 client config that speaks only `versions` (with rustls' own session cache,
    /// so one config resumes where another connection left a ticket).
    pub fn config_with(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.pki_root.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// A TLS connection with this SNI.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
        proto: Proto,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.config(proto));
        let name = ServerName::try_from(sni.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))?
    }

    /// The DNS names of the certificate the server presented for this SNI.
    pub async fn served_names(&self, addr: SocketAddr, sni: &str) -> std::io::Result<Vec<String>> {
        let tls = self.connect(addr, sni, Proto::H1).await?;
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| std::io::Error::other("no certificate"))?;
        Ok(limen::tls::leaf_facts(&der)
            .map_err(std::io::Error::other)?
            .0)
    }

    /// An HTTP connection (HTTP/1.1 or HTTP/2 by ALPN) to send several requests on.
    pub async fn open(&self, addr: SocketAddr, sni: &str, proto: Proto) -> Conn {
        let tls = self.connect(addr, sni, proto).await.unwrap();
        let io = TokioIo::new(tls);
        match proto {
            Proto::H1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn.with_upgrades());
                Conn::H1(send)
            }
            Proto::H2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                Conn::H2(send)
            }
        }
    }

    /// An HTTP/1.1 connection from the local address `from`, whose first bytes are `preface`
    /// (a PROXY protocol header, say) before TLS. Err: the handshake failed.
    pub async fn open_after(
        &self,
        from: std::net::IpAddr,
        addr: SocketAddr,
        sni: &str,
        preface: &[u8],
    ) -> std::io::Result<Conn> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let mut tcp = socket.connect(addr).await?;
        tcp.write_all(preface).await?;
        let connector = tokio_rustls::TlsConnector::from(self.config(Proto::H1));
        let name = ServerName::try_from(sni.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")
            })??;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }

    /// One GET on a new connection; `host` is both the SNI and the Host.
    pub async fn get(&self, addr: SocketAddr, host: &str, path: &str) -> Got {
        let mut c = self.open(addr, host, Proto::H1).await;
        c.get(host, path).await.unwrap()
    }

    /// One GET on a new `proto` connection with these request fields (each appended).
    pub async fn get_with(
        &self,
        addr: SocketAddr,
        host: &str,
        proto: Proto,
        path: &str,
        fields: &[(&str, &str)],
    ) -> Got {
        self.fetch_with(addr, host, proto, "GET", path, fields)
            .await
    }

    /// One bodiless request on a new `proto` connection with these request fields (each
    /// appended); the body comes back as sent (not decoded).
    pub async fn fetch_with(
        &self,
        addr: SocketAddr,
        host: &str,
        proto: Proto,
        method: &str,
        path: &str,
        fields: &[(&str, &str)],
    ) -> Got {
        let mut conn = self.open(addr, host, proto).await;
        let mut req = conn.request(method, host, path, body(""));
        for (k, v) in fields {
            req.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        conn.fetch(req).await.unwrap()
    }
}

pub enum Conn {
    H1(hyper::client::conn::http1::SendRequest<BackendBody>),
    H2(hyper::client::conn::http2::SendRequest<BackendBody>),
}

impl Conn {
    /// An HTTP/2 request to run on a task of its own, beside the connection's other streams.
    pub fn send_later(
        &self,
        req: Request<BackendBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + Send + 'static {
        let Conn::H2(s) = self else {
            panic!("send_later needs an HTTP/2 connection");
        };
        let mut s = s.clone();
        async move {
            s.ready().await?;
            s.send_request(req).await
        }
    }

    pub async fn send(
        &mut self,
        req: Request<BackendBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Conn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Conn::H2(_))
    }

    /// A request for `host` and `path` with an empty body; the caller adds what it needs.
    pub fn request(
        &self,
        method: &str,
        host: &str,
        path: &str,
        body: BackendBody,
    ) -> Request<BackendBody> {
        let mut b = Request::builder().method(method);
        if self.is_h2() {
            b = b.uri(format!("https://{host}{path}"));
        } else {
            b = b.uri(path).header(http::header::HOST, host);
        }
        b.body(body).unwrap()
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Got, BoxError> {
        let req = self.request("GET", host, path, full(Bytes::new()));
        self.fetch(req).await
    }

    pub async fn fetch(&mut self, req: Request<BackendBody>) -> Result<Got, BoxError> {
        let resp = self.send(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

pub fn body(b: impl Into<Bytes>) -> BackendBody {
    full(b)
}

/// A body of `total` bytes sent in 64 KiB frames, never held whole in memory.
pub fn streamed_body(total: u64) -> BackendBody {
    streamed_body_of(total, b'y')
}

fn streamed_body_of(total: u64, byte: u8) -> BackendBody {
    let chunk = Bytes::from(vec![byte; 64 * 1024]);
    let stream = futures_util::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(chunk.len() as u64);
            Some((
                Ok::<_, BoxError>(Frame::data(chunk.slice(..n as usize))),
                left - n,
            ))
        }
    });
    StreamBody::new(stream).boxed()
}

/// A route list sending every host and path to `b`.
pub fn route_all_to(b: &Backend) -> String {
    format!("  - {{host: \"*\", upstreams: [\"{}\"]}}\n", b.url())
}

/// Writes raw bytes on a TLS connection and reads what comes back until EOF or `patience`.
pub async fn raw_exchange(
    tls: &mut TlsStream<TcpStream>,
    request: &[u8],
    patience: Duration,
) -> (String, bool) {
    tls.write_all(request).await.unwrap();
    read_until_close(tls, patience).await
}

/// Reads until the peer closes (true) or `patience` runs out (false).
pub async fn read_until_close(
    tls: &mut TlsStream<TcpStream>,
    patience: Duration,
) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Resident memory of this process in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- reload helpers

impl Proxy {
    pub fn admin(&self) -> SocketAddr {
        self.running()
            .admin_addr
            .expect("the config has an admin listener")
    }

    pub fn generation(&self) -> u64 {
        self.running().shared.snapshot.load().generation
    }

    pub fn status(&self) -> limen::state::ReloadStatus {
        self.running().shared.reload_status.lock().unwrap().clone()
    }

    /// Rewrites the config as an editor does and waits (up to `patience`) until a new snapshot
    /// generation is served.
    pub async fn reconfigure(&self, yaml: &str, patience: Duration) {
        let gen = self.generation();
        write_atomic(&self.config_path, yaml);
        eventually(patience, "the new config is published", || async {
            self.generation() > gen
        })
        .await;
    }

    /// Waits (up to `patience`) until the reload status shows a config error containing `needle`.
    pub async fn refused_with(&self, needle: &str, patience: Duration) {
        eventually(
            patience,
            &format!("the edit is refused ({needle})"),
            || async {
                self.status()
                    .config
                    .errors
                    .iter()
                    .any(|e| e.contains(needle))
            },
        )
        .await;
    }

    /// The config file's folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Writes `contents` as an editor does: to a temp file beside `path`, then rename over it.
pub fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A GET on the admin listener: status code and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = admin_get_with(addr, path, None).await;
    (status, body)
}

/// An admin GET with an `Authorization` value: status, headers, body.
pub async fn admin_get_with(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, http::HeaderMap, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path)
        .header(http::header::HOST, "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    if let Some(a) = authorization {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, a.parse().unwrap());
    }
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------- a scripted upstream

/// An upstream that answers every request head with the same raw bytes, written as they are (so a
/// test can send what no well-behaved server would), then closes. Counts connections and heads.
pub struct Canned {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    /// The request heads received, as text.
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Canned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Canned {
    /// `answer` is written after each request head; with `keep_open` the connection then waits
    /// for the next head, else it is closed.
    pub async fn start(answer: &'static [u8], keep_open: bool) -> Canned {
        let listener = backend_listener("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r, h) = (connections.clone(), requests.clone(), heads.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, h) = (r.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            h.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&head).into_owned());
                            r.fetch_add(1, Ordering::SeqCst);
                            if tcp.write_all(answer).await.is_err() || !keep_open {
                                return;
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Canned {
            addr,
            connections,
            requests,
            heads,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Sends one raw HTTP/1.1 request on a new TLS connection and returns the status code and the
/// whole text read until the server closes (or `patience` runs out), and whether it closed.
pub async fn raw_request(
    client: &Client,
    addr: SocketAddr,
    host: &str,
    request: &str,
    patience: Duration,
) -> (u16, String, bool) {
    let mut tls = client.connect(addr, host, Proto::H1).await.unwrap();
    let (text, closed) = raw_exchange(&mut tls, request.as_bytes(), patience).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text, closed)
}

// ---------------------------------------------------------------- an HTTP/2 (h2c) upstream

/// A test upstream speaking HTTP/2 with prior knowledge (h2c) on 127.0.0.1. Paths:
/// - `/sleep/MS...`: answer `slept` after MS milliseconds;
/// - `/stream...`: echo each request body frame as it arrives (no buffering), then trailers
///   `grpc-status: 0`, `x-custom: yes` and `x-saw-trailer` (the request's `x-client-trailer`
///   trailer, `padded` if its value had whitespace at either end, or `none`);
/// - `/padded` and `/padded-trailer`: a field value with a leading space, in the head or in a
///   trailer after a body;
/// - anything else: a JSON `Echo` of the request (`backend` is `h2c`, `method`, `path` as
///   `:authority` + path, headers).
pub struct H2Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// Connections that have ended.
    pub closed: Arc<AtomicUsize>,
    conn_tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    pub requests: Arc<AtomicUsize>,
    /// The most streams in flight at once on one connection.
    pub max_concurrent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl H2Backend {
    pub fn url(&self) -> String {
        format!("h2c://{}", self.addr)
    }

    pub async fn start() -> H2Backend {
        H2Backend::start_with_goaway_after(usize::MAX).await
    }

    /// Each connection says GOAWAY (a graceful shutdown: streams in flight finish) once it has
    /// taken `n` requests.
    pub async fn start_with_goaway_after(n: usize) -> H2Backend {
        H2Backend::start_at("127.0.0.1:0".parse().unwrap(), n).await
    }

    /// The process dies: its listener and every connection go at once, with no GOAWAY.
    pub fn kill(&self) {
        self.task.abort();
        for t in self.conn_tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// A backend on `addr` (for a restart on the same port), saying GOAWAY after `n` requests.
    pub async fn start_at(addr: SocketAddr, n: usize) -> H2Backend {
        let listener = backend_listener(addr);
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let max_concurrent = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let conn_tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r, m) = (
            connections.clone(),
            requests.clone(),
            max_concurrent.clone(),
        );
        let (cl, ct) = (closed.clone(), conn_tasks.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, m) = (r.clone(), m.clone());
                let inflight = Arc::new(AtomicUsize::new(0));
                let taken = Arc::new(AtomicUsize::new(0));
                let enough = Arc::new(tokio::sync::Notify::new());
                let (taken2, enough2) = (taken.clone(), enough.clone());
                let cl = cl.clone();
                let handle = tokio::spawn(async move {
                    struct Ended(Arc<AtomicUsize>);
                    impl Drop for Ended {
                        fn drop(&mut self) {
                            self.0.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let _ended = Ended(cl);
                    let svc = service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        if taken2.fetch_add(1, Ordering::SeqCst) + 1 == n {
                            enough2.notify_one();
                        }
                        let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(now, Ordering::SeqCst);
                        let inflight = inflight.clone();
                        async move {
                            let resp = h2_answer(req).await;
                            inflight.fetch_sub(1, Ordering::SeqCst);
                            resp
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        () = enough.notified() => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
                ct.lock().unwrap().push(handle.abort_handle());
            }
        });
        H2Backend {
            addr,
            connections,
            closed,
            conn_tasks,
            requests,
            max_concurrent,
            task,
        }
    }
}

/// `/big-header/N`: a response head with one field of N bytes (both backends answer it).
fn big_header(path: &str) -> Option<Response<BackendBody>> {
    path.strip_prefix("/big-header/")?;
    let n = number_after(path, "/big-header/") as usize;
    let mut resp = Response::new(full("big"));
    resp.headers_mut().insert(
        "x-big",
        http::HeaderValue::from_str(&"a".repeat(n)).unwrap(),
    );
    Some(resp)
}

async fn h2_answer(req: Request<Incoming>) -> Result<Response<BackendBody>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(resp) = big_header(&path) {
        return Ok(resp);
    }
    if path == "/padded-trailer" {
        // The same in a trailer field, after a body.
        let mut t = http::HeaderMap::new();
        t.insert("x-pad", http::HeaderValue::from_static(" v"));
        let frames = [Frame::data(Bytes::from_static(b"body")), Frame::trailers(t)];
        let stream = futures_util::stream::iter(frames.map(Ok::<_, BoxError>));
        return Ok(Response::new(StreamBody::new(stream).boxed()));
    }
    if path == "/padded" {
        // A field value with a leading space: malformed in HTTP/2.
        let mut resp = Response::new(full("padded"));
        resp.headers_mut()
            .insert("x-pad", http::HeaderValue::from_static(" v"));
        return Ok(resp);
    }
    if path.starts_with("/sleep/") {
        tokio::time::sleep(Duration::from_millis(number_after(&path, "/sleep/"))).await;
        return Ok(Response::new(full("slept")));
    }
    if path.starts_with("/stream") {
        let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(4);
        let mut body = req.into_body();
        tokio::spawn(async move {
            let mut saw = String::from("none");
            while let Some(Ok(frame)) = body.frame().await {
                match frame.into_data() {
                    Ok(d) => {
                        if tx.send(Frame::data(d)).await.is_err() {
                            return;
                        }
                    }
                    Err(f) => {
                        if let Some(v) = f.trailers_ref().and_then(|t| t.get("x-client-trailer")) {
                            saw = String::from_utf8_lossy(v.as_bytes()).into_owned();
                        }
                    }
                }
            }
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            t.insert("x-custom", http::HeaderValue::from_static("yes"));
            // A padded value is reported by name: echoed, it would be malformed itself.
            if saw.trim() != saw {
                saw = String::from("padded");
            }
            t.insert("x-saw-trailer", http::HeaderValue::from_str(&saw).unwrap());
            let _ = tx.send(Frame::trailers(t)).await;
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|f| (Ok::<_, BoxError>(f), rx))
        });
        let mut resp = Response::new(StreamBody::new(stream).boxed());
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        return Ok(resp);
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let json = serde_json::json!({
        "backend": "h2c",
        "method": req.method().to_string(),
        "path": format!("{}{}", req.uri().authority().map_or("", |a| a.as_str()),
            req.uri().path_and_query().map_or("", |p| p.as_str())),
        "headers": headers,
        "body_len": 0,
    });
    Ok(Response::new(full(json.to_string())))
}

/// A request body the test feeds frame by frame (data, then perhaps trailers).
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Frame<Bytes>>, BackendBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, BoxError>(f), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

// ---------------------------------------------------------------- a TLS upstream

/// A test upstream that speaks TLS (certificate from `pki` for `names`, IPs included), then
/// HTTP/2 or HTTP/1.1 as ALPN chose, answering a JSON `Echo` whose `backend` is
/// `tls PROTO sni=SNI client=yes|no`. With `client_ca`, it requires a client certificate issued
/// by that CA.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// The key exchange group each accepted connection negotiated (`X25519MLKEM768`, ...).
    pub groups: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn start(
        pki: &Pki,
        names: &[&str],
        alpn: &[&str],
        client_ca: Option<&Pki>,
    ) -> TlsBackend {
        use rustls::pki_types::pem::PemObject;
        let issued = pki.issue(names);
        let chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()];
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.ca_der.clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(chain, key).unwrap();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = backend_listener("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let groups = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, g) = (connections.clone(), groups.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let (c, g) = (c.clone(), g.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    c.fetch_add(1, Ordering::SeqCst);
                    let (_, session) = tls.get_ref();
                    if let Some(group) = session.negotiated_key_exchange_group() {
                        g.lock().unwrap().push(format!("{:?}", group.name()));
                    }
                    let h2 = session.alpn_protocol() == Some(b"h2");
                    let name = format!(
                        "tls {} sni={} client={}",
                        if h2 { "h2" } else { "http/1.1" },
                        session.server_name().unwrap_or("-"),
                        if session.peer_certificates().is_some() {
                            "yes"
                        } else {
                            "no"
                        },
                    );
                    let svc = service_fn(move |req| backend_answer(req, name.clone()));
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    }
                });
            }
        });
        TlsBackend {
            addr,
            connections,
            groups,
            task,
        }
    }
}

// ---------------------------------------------------------------- a relay that can black-hole

/// A TCP relay in front of an upstream. `black_hole` makes every connection open now swallow all
/// bytes both ways without closing: the network between limen and a host that vanished without a
/// FIN or RST. Connections accepted afterwards relay normally (the host came back).
pub struct Relay {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Black-holed connections that limen closed.
    pub dropped: Arc<AtomicUsize>,
    era: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = backend_listener("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let (connections, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let era = Arc::new(AtomicUsize::new(0));
        let (c, d, e) = (connections.clone(), dropped.clone(), era.clone());
        let task = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (d, e, born) = (d.clone(), e.clone(), e.load(Ordering::SeqCst));
                tasks.spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let alive = |e: &AtomicUsize| e.load(Ordering::SeqCst) == born;
                    let mut up = [0u8; 16384];
                    let mut down = [0u8; 16384];
                    loop {
                        tokio::select! {
                            n = cr.read(&mut up) => match n {
                                Ok(0) | Err(_) => {
                                    if !alive(&e) {
                                        d.fetch_add(1, Ordering::SeqCst);
                                    }
                                    return;
                                }
                                Ok(n) if alive(&e) => {
                                    if sw.write_all(&up[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(_) => {}
                            },
                            n = sr.read(&mut down) => match n {
                                Ok(0) | Err(_) if alive(&e) => return,
                                Ok(n) if alive(&e) => {
                                    if cw.write_all(&down[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                // Black-holed: nothing more from the upstream's side.
                                _ => break,
                            },
                        }
                    }
                    // Swallow what limen sends until it gives up on the connection.
                    while let Ok(n) = cr.read(&mut up).await {
                        if n == 0 {
                            break;
                        }
                    }
                    d.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Relay {
            addr,
            connections,
            dropped,
            era,
            task,
        }
    }

    pub fn black_hole(&self) {
        self.era.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- an upstream that can be sick

/// An HTTP/1.1 upstream whose health endpoint and answers are switched by the test.
/// - `/healthz`: the status in `health` (0: never answers);
/// - `/sleep/N`: waits N ms, then as below;
/// - anything else: the status in `answer` with the body `NAME BODY_LEN` (0: the connection is
///   dropped without an answer, as a crashing server does).
pub struct Switch {
    pub addr: SocketAddr,
    pub health: Arc<std::sync::atomic::AtomicU16>,
    pub answer: Arc<std::sync::atomic::AtomicU16>,
    /// Requests other than health checks.
    pub hits: Arc<AtomicUsize>,
    /// Health checks, with the Host each carried.
    pub checks: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Switch {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn start(name: &str) -> Switch {
        Switch::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_at(name: &str, addr: SocketAddr) -> Switch {
        use std::sync::atomic::AtomicU16;
        let listener = backend_listener(addr);
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(AtomicU16::new(200));
        let answer = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, a, n, c) = (health.clone(), answer.clone(), hits.clone(), checks.clone());
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (h, a, n, c, name) = (h.clone(), a.clone(), n.clone(), c.clone(), name.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, a, n, c, name) =
                            (h.clone(), a.clone(), n.clone(), c.clone(), name.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            if path == "/healthz" {
                                let host = req
                                    .headers()
                                    .get(http::header::HOST)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                c.lock().unwrap().push(host);
                                let status = h.load(Ordering::SeqCst);
                                if status == 0 {
                                    std::future::pending::<()>().await;
                                }
                                let mut r = Response::new(full("health"));
                                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                                return Ok::<_, std::io::Error>(r);
                            }
                            n.fetch_add(1, Ordering::SeqCst);
                            if path.starts_with("/sleep/") {
                                let ms = number_after(&path, "/sleep/");
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let status = a.load(Ordering::SeqCst);
                            let mut body = req.into_body();
                            let mut len = 0usize;
                            while let Some(Ok(f)) = body.frame().await {
                                len += f.data_ref().map_or(0, |d| d.len());
                            }
                            if status == 0 {
                                return Err(std::io::Error::other("dropped"));
                            }
                            let mut r = Response::new(full(format!("{name} {len}")));
                            *r.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Switch {
            addr,
            health,
            answer,
            hits,
            checks,
            task,
        }
    }

    pub fn checks(&self) -> usize {
        self.checks.lock().unwrap().len()
    }
}

/// A metric's value from a Prometheus exposition: the first line that starts with `line_prefix`.
pub fn metric(metrics: &str, line_prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/status.json` of a running proxy.
pub async fn status_json(proxy: &Proxy) -> serde_json::Value {
    let (code, body) = admin_get(proxy.admin(), "/status.json").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

/// The `upstream_health` entry of the upstream at `url`, in the route named `route`.
pub async fn upstream_state(proxy: &Proxy, route: &str, url: &str) -> serde_json::Value {
    let st = status_json(proxy).await;
    st["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == route)
        .and_then(|r| {
            r["upstream_health"]
                .as_array()
                .unwrap()
                .iter()
                .find(|u| u["url"] == url)
                .cloned()
        })
        .unwrap_or_else(|| panic!("no upstream {url} in route {route}: {st}"))
}

/// `limen --config PATH --check` run as the binary: its exit code and everything it printed.
pub fn check_config(path: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_limen"))
        .arg("--config")
        .arg(path)
        .arg("--check")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// One request to `host` over a new connection made with `cfg`: whether its handshake resumed a
/// session.
pub async fn resumes(cfg: &Arc<rustls::ClientConfig>, host: &str, addr: SocketAddr) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind();
    // A request, so the tickets a TLS 1.3 server sends after the handshake are read.
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    kind == Some(rustls::HandshakeKind::Resumed)
}

/// An address that refuses connections, held for the caller: a socket bound to a port but not
/// listening answers every SYN with a reset, and while it is held no other test's listener can be
/// given the same port (a port merely bound and dropped can be, and then the "dead" upstream
/// answers).
pub fn refused_port() -> (SocketAddr, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (addr, socket)
}

/// A test backend's listening socket, with the backlog real servers use (limen's own listeners
/// take 1024, nginx 511). Tokio's `bind` takes 128, like std: a burst of 200 dials from limen to a
/// backend whose accept loop shares the test's two busy threads overflows that queue, the kernel
/// drops SYNs, and the 1 s SYN retransmit makes a healthy backend look black-holed.
pub fn backend_listener(addr: SocketAddr) -> TcpListener {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(1024).unwrap();
    socket.set_nonblocking(true).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

/// An address whose connects hang (`host:port`): a listener that never accepts, its accept queue
/// filled, so the kernel drops every further SYN. The sockets are returned to keep it so.
pub fn black_holed() -> (String, Vec<std::net::TcpStream>, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fill.push(s),
            Err(_) => break,
        }
    }
    (addr.to_string(), fill, socket)
}

/// Runs headless Chromium on `url` with its own profile, the flags a locked-down machine needs,
/// and `args` (the test's own).
pub fn browse(url: &str, profile: &Path, args: &[&str]) -> std::process::Output {
    let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is not installed: `apt-get install chromium` (.ci/run does)");
    std::process::Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs")
}
