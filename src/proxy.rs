//! The request path: from one decoded client request to a response, through the route table and an
//! upstream.
//!
//! Owns: host checks (400/421), routing (404), forwarding headers, hop-by-hop stripping, body guards
//! (size, idle, minimum rate), upstream choice and retry before sending (502), the response timeout
//! (504), protocol upgrades (WebSocket tunnels), and the access log. Reads the snapshot once per
//! request and never touches the filesystem.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub use crate::body::BoxError;
use crate::body::{
    BodyFault, BodyState, RequestBody, BODY_CLIENT_ERROR, BODY_DONE, BODY_IDLE, BODY_OK, BODY_SLOW,
    BODY_TOO_LARGE,
};
use crate::config::Config;
use crate::headers::{
    check_response_framing, clean_trailers, drop_underscored, has_token, strip_hop_by_hop, tokens,
};
use crate::routing::{Action, Route};
use crate::state::{Shared, Snapshot};
use crate::tls::LoadedCert;
use crate::upstream::{InFlight, PooledConn};
use crate::watch::{Activity, StreamClock};

/// What the request path knows about the client connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The SNI the client sent, lower case.
    pub sni: Option<String>,
    /// The certificate the handshake presented.
    pub presented: Option<Arc<LoadedCert>>,
    pub forwarding: PeerForwarding,
    /// The client-certificate policy the handshake applied.
    pub client_auth: Option<(
        Arc<crate::config::ClientAuthSpec>,
        Arc<rustls::RootCertStore>,
    )>,
    /// `Client-Cert` / `Client-Cert-Chain` of the verified certificate, for a policy that
    /// forwards it.
    pub client_cert: Option<crate::headers::ClientCertFields>,
    pub activity: Arc<Activity>,
    /// Turns true when shutdown begins; an upgraded tunnel then has `shutdown_grace` to end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The connection's place under `limits.max_connections`, held as long as this is alive,
    /// which includes an upgraded tunnel's life.
    pub _permit: crate::state::ConnPermit,
}

// ---- response body ----

/// One line per request, written when the response body is finished or dropped.
struct AccessLog {
    /// The client's address (from the PROXY header when one came).
    client: SocketAddr,
    method: Method,
    host: String,
    path: String,
    status: u16,
    route: Option<Arc<Route>>,
    upstream: Option<Arc<str>>,
    started: Instant,
    bytes: u64,
    activity: Arc<Activity>,
    shared: Arc<Shared>,
    enabled: bool,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.activity.request_finished();
        static NONE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        let m = &self.shared.metrics;
        let seconds = self.started.elapsed().as_secs_f64();
        let label = match &self.route {
            Some(r) => {
                r.watch.answered(self.status);
                r.duration
                    .get_or_init(|| {
                        m.request_duration
                            .get_or_create_owned(&crate::metrics::RouteLabel {
                                route: r.label.clone(),
                            })
                    })
                    .observe(seconds);
                r.label.clone()
            }
            None => {
                let none = NONE.get_or_init(|| Arc::from("none")).clone();
                m.request_duration
                    .get_or_create(&crate::metrics::RouteLabel {
                        route: none.clone(),
                    })
                    .observe(seconds);
                none
            }
        };
        m.requests
            .get_or_create(&crate::metrics::RequestLabels {
                route: label,
                code: self.status,
            })
            .inc();
        if !self.enabled {
            return;
        }
        tracing::info!(
            target: "limen::access",
            client = %self.client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status,
            bytes = self.bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            route = self.route.as_ref().map_or("-", |r| &*r.label),
            upstream = self.upstream.as_deref().unwrap_or("-"),
        );
    }
}

enum Inner {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        conn: Option<PooledConn>,
        /// The request counts in its upstream's `in_flight` until its response ends.
        _in_flight: InFlight,
        request_body: Arc<BodyState>,
        /// Armed only when the upstream makes the body wait, so a quick response costs no timer;
        /// an upstream that stalls mid-body past `body_idle` ends the response.
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        body_idle: Duration,
        /// A frame arrived since the stall timer was last armed.
        moved: bool,
    },
}

/// The body of every response limen sends.
pub struct ResponseBody {
    inner: Inner,
    log: Option<AccessLog>,
    /// HTTP/2: the stream's clock, told when hyper polls and when it was handed data.
    stream: Option<Arc<StreamClock>>,
    /// HTTP/2: the rest of a data frame handed over in `H2_PIECE` pieces.
    rest: Bytes,
}

/// HTTP/2 bodies are handed to hyper at most this much at a time. hyper polls for more only once
/// the previous piece has left, so the stream clock measures progress in pieces: a client that
/// reads slowly but steadily never looks stalled, and a stalled stream holds at most one piece
/// (an upstream read can bring 400 KiB at once).
const H2_PIECE: usize = 16 * 1024;

impl ResponseBody {
    fn full(b: Bytes) -> ResponseBody {
        ResponseBody {
            inner: Inner::Full((!b.is_empty()).then_some(b)),
            log: None,
            stream: None,
            rest: Bytes::new(),
        }
    }
}

/// Returns the upstream connection to its pool when both bodies of the exchange ended cleanly;
/// otherwise it is dropped, and with it the connection. `ended`: the response body was read to
/// its end (a chunked body never reports `is_end_stream`, even then).
fn release_if_clean(ended: bool, conn: &mut Option<PooledConn>, request_body: &BodyState) {
    if let Some(c) = conn.take() {
        if ended && request_body.get() == BODY_DONE {
            c.release();
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper stops polling a body once it reports its end, so the release may happen here.
        if let Inner::Upstream {
            body,
            conn,
            request_body,
            ..
        } = &mut self.inner
        {
            release_if_clean(body.is_end_stream(), conn, request_body);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(s) = &this.stream {
            s.polled();
        }
        let polled = if !this.rest.is_empty() {
            let n = this.rest.len().min(H2_PIECE);
            Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
        } else {
            this.poll_inner(cx)
        };
        let polled = match polled {
            Poll::Ready(Some(Ok(frame))) if this.stream.is_some() => {
                Poll::Ready(Some(Ok(match frame.into_data() {
                    Ok(mut data) if data.len() > H2_PIECE => {
                        this.rest = data.split_off(H2_PIECE);
                        Frame::data(data)
                    }
                    Ok(data) => Frame::data(data),
                    Err(other) => other,
                })))
            }
            other => other,
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                if let Some(log) = this.log.as_mut() {
                    log.bytes += d.len() as u64;
                }
                if let Some(s) = &this.stream {
                    s.handed_data();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
            && match &self.inner {
                Inner::Full(b) => b.is_none(),
                Inner::Upstream { body, .. } => body.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream { body, .. } => body.size_hint(),
        };
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl ResponseBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream {
                body,
                conn,
                request_body,
                stall,
                body_idle,
                moved,
                ..
            } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(None) => {
                    release_if_clean(true, conn, request_body);
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    conn.take();
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
                Poll::Ready(Some(Ok(mut frame))) => {
                    *moved = true;
                    if let Some(t) = frame.trailers_mut() {
                        clean_trailers(t);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + *body_idle;
                    match stall {
                        None => *stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                        Some(s) if *moved => s.as_mut().reset(deadline),
                        Some(_) => {}
                    }
                    *moved = false;
                    match stall.as_mut().map(|s| s.as_mut().poll(cx)) {
                        Some(Poll::Ready(())) => {
                            conn.take();
                            Poll::Ready(Some(Err(Box::new(BodyFault(
                                "upstream response body stalled past timeouts.body_idle",
                            )) as BoxError)))
                        }
                        _ => Poll::Pending,
                    }
                }
            },
        }
    }
}

// ---- limen's own answers ----

/// Why limen answered a request itself. Each variant says what happened in general terms; the
/// detail (addresses, OS and library errors) goes to the log and metrics, never to the client.
/// `into_response` is the one place that turns any of them into a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The request is malformed; the reason is fixed text, never an echo of the input.
    BadRequest(&'static str),
    /// The connection's certificate does not cover the request's host.
    Misdirected,
    /// The host has a client-certificate policy this connection's handshake did not apply (or
    /// applied with a CA bundle since rotated): it can never serve that host, so it closes.
    ClientAuthMismatch,
    MethodNotAllowed,
    NoRoute,
    /// The declared or received request body is over `limits.max_body_bytes`.
    TooLarge,
    /// No upstream of the route accepted a connection.
    NoUpstream,
    /// limen's own upstream connection budget (from the open-file limit) had no room in time.
    Overloaded,
    /// The upstream closed, reset or broke the exchange.
    UpstreamFailed,
    /// The upstream's response cannot be relayed safely (framing, or a 101 nobody asked for).
    BadUpstreamResponse,
    /// The upstream did not answer within the route's timeout.
    Timeout,
    BodyIdle,
    BodySlow,
    BodyAborted,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BodyAborted => StatusCode::BAD_REQUEST,
            ProxyError::Misdirected | ProxyError::ClientAuthMismatch => {
                StatusCode::MISDIRECTED_REQUEST
            }
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoUpstream
            | ProxyError::UpstreamFailed
            | ProxyError::BadUpstreamResponse => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyIdle | ProxyError::BodySlow => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn message(self) -> &'static str {
        match self {
            ProxyError::BadRequest(why) => why,
            ProxyError::Misdirected => "this connection's certificate does not cover the requested host; open a connection for that name",
            ProxyError::ClientAuthMismatch => "this host verifies client certificates on connections of its own; open a new connection for that name",
            ProxyError::MethodNotAllowed => "limen does not proxy this method",
            ProxyError::NoRoute => "no route for this host and path",
            ProxyError::TooLarge => "the request body is too large",
            ProxyError::NoUpstream => "the upstream refused the connection or could not be reached",
            ProxyError::UpstreamFailed => "the upstream closed the connection or failed to answer",
            ProxyError::BadUpstreamResponse => "the upstream sent a response that cannot be relayed",
            ProxyError::Timeout => "the upstream did not answer in time",
            ProxyError::Overloaded => "the proxy is at its connection limit; try again shortly",
            ProxyError::BodyIdle => "the request body stopped arriving",
            ProxyError::BodySlow => "the request body arrived too slowly",
            ProxyError::BodyAborted => "the request body was malformed or aborted",
        }
    }

    /// The connection cannot carry another request: its framing is in doubt, or an unread body
    /// is still on the wire.
    fn closes(self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::TooLarge
                | ProxyError::ClientAuthMismatch
                | ProxyError::BadUpstreamResponse
                | ProxyError::BodyIdle
                | ProxyError::BodySlow
                | ProxyError::BodyAborted
        )
    }

    /// The plain-text response for this error (`Connection: close` where the connection ends).
    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        let text = format!(
            "{} {}: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.message()
        );
        let mut resp = plain(status, Bytes::from(text));
        if self.closes() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl ProxyError {
    /// The gRPC status code for this error, as Envoy maps them.
    fn grpc_status(self) -> u8 {
        match self {
            ProxyError::NoRoute | ProxyError::MethodNotAllowed => 12, // UNIMPLEMENTED
            ProxyError::Timeout | ProxyError::BodyIdle | ProxyError::BodySlow => 4, // DEADLINE_EXCEEDED
            ProxyError::TooLarge => 8, // RESOURCE_EXHAUSTED
            ProxyError::BadRequest(_) | ProxyError::BodyAborted => 13, // INTERNAL
            ProxyError::Misdirected
            | ProxyError::ClientAuthMismatch
            | ProxyError::NoUpstream
            | ProxyError::UpstreamFailed
            | ProxyError::BadUpstreamResponse
            | ProxyError::Overloaded => 14, // UNAVAILABLE
        }
    }

    /// The answer a gRPC client can read: a trailers-only response (HTTP 200, `grpc-status` and
    /// `grpc-message` in the only header block). 421 stays 421, so a client that coalesced
    /// connections retries on a new one.
    pub fn into_grpc_response(self) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::full(Bytes::new()));
        if self.status() == StatusCode::MISDIRECTED_REQUEST {
            *resp.status_mut() = StatusCode::MISDIRECTED_REQUEST;
        }
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_status())),
        );
        // The messages are printable ASCII without '%', so they need no percent-encoding.
        h.insert("grpc-message", HeaderValue::from_static(self.message()));
        resp
    }
}

/// `content-type: application/grpc` (with any `+proto`, `+json`, `;...` suffix).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n), per the gRPC HTTP/2 protocol.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// An HTTP/2 upstream request carries its authority in the URI (`:authority`), not in `Host`,
/// and takes no upgrade.
fn to_h2_form(req: &mut Request<RequestBody>, tls: bool) -> Result<(), ProxyError> {
    let h = req.headers_mut();
    let host = h.remove(header::HOST);
    h.remove(header::UPGRADE);
    h.remove(header::CONNECTION);
    let authority = host
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("malformed request target"))?;
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// A plain-text response made by limen itself (errors and `respond` routes).
fn plain(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// HEAD answers and 204/304 made by limen carry no body (RFC 9110 9.3.2, 15.3.5, 15.4.5); a HEAD
/// keeps the length the GET would have had.
fn without_forbidden_body(resp: &mut Response<ResponseBody>, head: bool) {
    let status = resp.status();
    let no_content = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if !(head || no_content) {
        return;
    }
    if let Inner::Full(body) = &mut resp.body_mut().inner {
        let len = body.take().map_or(0, |b| b.len());
        let h = resp.headers_mut();
        if no_content {
            h.remove(header::CONTENT_LENGTH);
            h.remove(header::CONTENT_TYPE);
        } else {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
}

// ---- helpers ----

/// The protocols an HTTP/1.1 client asked to switch to (`Connection: upgrade` and `Upgrade`),
/// without `h2c`/`h2`: RFC 9113 3.1 removed that mechanism, and no upstream is asked to switch
/// to HTTP/2 behind limen. None: this is not an upgrade request.
fn offered_upgrades<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || !has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return None;
    }
    let kept: Vec<&str> = tokens(req.headers(), header::UPGRADE)
        .filter(|t| {
            let name = t.split('/').next().unwrap_or("");
            !(name.eq_ignore_ascii_case("h2c") || name.eq_ignore_ascii_case("h2"))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// The upstream's 101 names at least one protocol, and only protocols the client offered
/// (RFC 9110 7.8): anything else would turn the connection into a raw pipe nobody agreed to.
fn upgrade_agreed(response: &HeaderMap, offered: &HeaderValue) -> bool {
    let offered: Vec<&str> = offered
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let mut named = tokens(response, header::UPGRADE).peekable();
    named.peek().is_some() && named.all(|t| offered.iter().any(|o| o.eq_ignore_ascii_case(t)))
}

/// Splits `host[:port]` (with `[v6]` brackets) and lower-cases the host. None when malformed.
pub fn host_without_port(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok()))
        {
            return None;
        }
        &rest[..end]
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            Some(_) => return None,
            None => authority,
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// The request's host: HTTP/2's `:authority` (which must agree with any `host` header), else the
/// one and only `Host` header.
fn request_host<B>(req: &Request<B>) -> Result<String, &'static str> {
    let hosts = req.headers().get_all(header::HOST);
    let mut iter = hosts.iter();
    let first = iter.next();
    let second = iter.next();
    if req.version() == Version::HTTP_2 {
        let auth = req.uri().authority().map(|a| a.as_str());
        let raw = match (auth, first) {
            (Some(a), Some(h)) => {
                if second.is_some() || !h.as_bytes().eq_ignore_ascii_case(a.as_bytes()) {
                    return Err(":authority and host disagree");
                }
                a
            }
            (Some(a), None) => a,
            (None, Some(h)) => h.to_str().map_err(|_| "malformed host header")?,
            (None, None) => return Err("missing :authority"),
        };
        return host_without_port(raw).ok_or("malformed :authority");
    }
    let h = match (first, second) {
        (Some(h), None) => h,
        (None, _) => return Err("missing Host header"),
        (Some(_), Some(_)) => return Err("more than one Host header"),
    };
    let h = h.to_str().map_err(|_| "malformed Host header")?;
    if let Some(a) = req.uri().authority() {
        // absolute-form: the target's authority rules and Host is ignored (RFC 9112 3.2.2).
        return host_without_port(a.as_str()).ok_or("malformed request target");
    }
    host_without_port(h).ok_or("malformed Host header")
}

/// What a connection contributes to forwarding headers, worked out once per connection rather than
/// once per request.
#[derive(Debug)]
pub struct PeerForwarding {
    /// The client address as `X-Forwarded-For` carries it.
    xff: HeaderValue,
    /// The `for=` node of `Forwarded` (IPv6 quoted and bracketed, RFC 7239).
    node: String,
}

impl PeerForwarding {
    pub fn new(peer: IpAddr) -> PeerForwarding {
        let ip = peer.to_canonical().to_string();
        let node = match peer.to_canonical() {
            IpAddr::V4(_) => ip.clone(),
            IpAddr::V6(_) => format!("\"[{ip}]\""),
        };
        PeerForwarding {
            xff: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            node,
        }
    }
}

/// Joins what a trusted proxy sent before us with our own entry.
fn chain(headers: &HeaderMap, name: &HeaderName, ours: &[u8]) -> Option<HeaderValue> {
    let mut out: Vec<u8> = Vec::with_capacity(64);
    for v in headers.get_all(name) {
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ours);
    HeaderValue::from_bytes(&out).ok()
}

fn set_forwarded(headers: &mut HeaderMap, fwd: &PeerForwarding, host: &str, trusted: bool) {
    let xff = HeaderName::from_static("x-forwarded-for");
    // `insert` replaces every earlier value, which is what an untrusted client's values deserve.
    let xff_value = if trusted {
        chain(headers, &xff, fwd.xff.as_bytes())
    } else {
        Some(fwd.xff.clone())
    };
    if let Some(v) = xff_value {
        headers.insert(xff, v);
    }

    let mut ours = String::with_capacity(32 + fwd.node.len() + host.len());
    ours.push_str("for=");
    ours.push_str(&fwd.node);
    ours.push_str(";host=\"");
    ours.push_str(host);
    ours.push_str("\";proto=https");
    let value = if trusted {
        chain(headers, &header::FORWARDED, ours.as_bytes())
    } else {
        HeaderValue::from_str(&ours).ok()
    };
    if let Some(v) = value {
        headers.insert(header::FORWARDED, v);
    }

    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
}

/// HTTP/2 may split cookies into several fields; HTTP/1.1 wants one, joined by "; "
/// (RFC 9113 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

// ---- the handler ----

/// Serves one request. Never fails: every problem becomes an HTTP response.
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
) -> Result<Response<ResponseBody>, Infallible> {
    conn.activity.request_started();
    let started = Instant::now();
    let snap = shared.snapshot.load_full();
    let method = req.method().clone();
    let enabled = snap.config.access_log;
    let path = if enabled {
        req.uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
    } else {
        String::new()
    };
    let head = method == Method::HEAD;
    let mut log = AccessLog {
        client: conn.peer,
        method,
        host: String::new(),
        path,
        status: 0,
        route: None,
        upstream: None,
        started,
        bytes: 0,
        activity: conn.activity.clone(),
        shared: shared.clone(),
        enabled,
    };
    let h2 = req.version() == Version::HTTP_2;
    let grpc = is_grpc(req.headers());
    let mut resp = match route_request(req, grpc, &conn, &snap, &mut log).await {
        Ok(r) => r,
        Err(e) if grpc => e.into_grpc_response(),
        Err(e) => e.into_response(),
    };
    // The route's response edits, on the upstream's answer and on limen's own alike (not on a
    // 101: its fields belong to the upgrade).
    if let Some(route) = &log.route {
        let edits = &route.headers.response;
        if !edits.is_empty() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            edits.apply(resp.headers_mut());
        }
    }
    without_forbidden_body(&mut resp, head);
    if h2 && resp.status().as_u16() >= 400 {
        // `Connection: close` means nothing in HTTP/2 (hyper would drop it with a warning).
        resp.headers_mut().remove(header::CONNECTION);
    }
    log.status = resp.status().as_u16();
    let body = resp.body_mut();
    body.log = Some(log);
    if h2 {
        body.stream = StreamClock::current();
    }
    Ok(resp)
}

/// The stages of one request: admit, then answer a `respond` route or prepare, forward and
/// respond. Each stage is a function of its own.
async fn route_request(
    mut req: Request<Incoming>,
    grpc: bool,
    conn: &Arc<ConnInfo>,
    snap: &Snapshot,
    log: &mut AccessLog,
) -> Result<Response<ResponseBody>, ProxyError> {
    let cfg = &*snap.config;
    let admitted = admit(&req, conn, snap)?;
    if log.enabled {
        log.host.clone_from(&admitted.host);
    }
    log.route = Some(admitted.route.clone());
    admit_body(&req, cfg)?;
    let group = match &admitted.route.action {
        Action::Respond { status, body } => return Ok(plain(*status, body.clone())),
        Action::Proxy(group) => group,
    };
    // OPTIONS with Max-Forwards 0 is answered here, as its final recipient (RFC 9110 7.6.2).
    if *req.method() == Method::OPTIONS && max_forwards(req.headers()) == Some(0) {
        return Ok(plain(StatusCode::OK, Bytes::new()));
    }
    let offered = offered_upgrades(&req);
    let client_upgrade = offered
        .clone()
        .map(|protocols| (hyper::upgrade::on(&mut req), protocols));
    let (parts, body) = req.into_parts();
    let prepared = prepare(parts, &admitted, conn, cfg, offered)?;
    let body_state = Arc::new(BodyState::default());
    let body = RequestBody::new(body, cfg, body_state.clone(), grpc);
    // A gRPC deadline shorter than the route's timeout bounds the wait for the response head.
    // Only for gRPC: anyone can send the header, and its deadline is the client's, not a sign
    // that the upstream is slow (forward neither ejects nor retries for it).
    let timeout = grpc
        .then(|| grpc_timeout(&prepared.headers))
        .flatten()
        .map_or(admitted.route.timeout, |t| t.min(admitted.route.timeout));
    let replay = replayable(
        &prepared.method,
        &prepared.headers,
        body_state.get() == BODY_DONE,
        client_upgrade.is_some(),
        grpc,
    );
    let (up_resp, pooled, in_flight) = forward(
        prepared,
        body,
        group,
        &admitted.route,
        timeout,
        replay,
        cfg,
        log,
    )
    .await?;
    respond(
        up_resp,
        pooled,
        in_flight,
        body_state,
        client_upgrade,
        &admitted.route,
        conn,
        cfg,
        &log.shared,
        grpc,
    )
}

/// What admission learnt about a request.
struct Admitted {
    host: String,
    route: Arc<Route>,
    /// The host is under a client-certificate policy, which this connection's handshake applied.
    mtls: bool,
    /// The normalized path and the original query: what is routed on and sent upstream.
    target: String,
}

/// Stage 1: the host (400), the connection's certificate covers it (421), the method (405), the
/// path normalized (400) and routed (404), and a declared body within the limit (413).
fn admit<B>(req: &Request<B>, conn: &ConnInfo, snap: &Snapshot) -> Result<Admitted, ProxyError> {
    let cfg = &*snap.config;
    let host = request_host(req).map_err(ProxyError::BadRequest)?;
    let covered = match &conn.presented {
        Some(cert) => cert.covers(&host) || (conn.sni.is_none() && is_ip_literal(&host)),
        None => false,
    };
    if !covered {
        return Err(ProxyError::Misdirected);
    }
    // No bypass by Host: a host under a tls.client_auth policy is served only on a connection
    // whose handshake applied that same policy (not another SNI's, nor the no-SNI one, even
    // when one certificate covers both names).
    // A rotated CA bundle counts as another policy: a certificate of a CA just removed does not
    // keep its access on a connection that stays open.
    let mtls = match snap.tls.policy_for_host(&host) {
        None => false,
        Some((p, roots))
            if conn
                .client_auth
                .as_ref()
                .is_some_and(|(a, r)| (Arc::ptr_eq(a, p) || a == p) && Arc::ptr_eq(r, roots)) =>
        {
            true
        }
        Some(_) => return Err(ProxyError::ClientAuthMismatch),
    };
    if matches!(*req.method(), Method::CONNECT | Method::TRACE) {
        return Err(ProxyError::MethodNotAllowed);
    }
    // `OPTIONS *` (asterisk-form) asks about the server as a whole: it goes where `/` goes, as `*`.
    let asterisk = *req.method() == Method::OPTIONS && req.uri().path() == "*";
    let path = if asterisk {
        std::borrow::Cow::Borrowed("/")
    } else {
        crate::normalize::normalize_path(req.uri().path(), cfg.escaped_slashes)
            .map_err(path_refusal)?
    };
    let route = snap
        .routes
        .lookup(&host, &path)
        .ok_or(ProxyError::NoRoute)?
        .clone();
    let target = match req.uri().query() {
        _ if asterisk => "*".to_owned(),
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    Ok(Admitted {
        host,
        route,
        mtls,
        target,
    })
}

/// Stage 1, last: a declared body within `limits.max_body_bytes` (413). Apart from `admit` so the
/// refusal is already the route's (its response edits apply).
fn admit_body<B>(req: &Request<B>, cfg: &Config) -> Result<(), ProxyError> {
    let max = cfg.limits.max_body_bytes;
    if max > 0 {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(ProxyError::TooLarge);
        }
    }
    Ok(())
}

fn max_forwards(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::MAX_FORWARDS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn path_refusal(e: crate::normalize::PathError) -> ProxyError {
    use crate::normalize::PathError;
    ProxyError::BadRequest(match e {
        PathError::NotAbsolute => "the request target is not an absolute path",
        PathError::BadEscape => "the path has a malformed percent-escape",
        PathError::EscapedSlash => "the path has an encoded slash or backslash",
        PathError::Backslash => "the path has a backslash",
        PathError::AboveRoot => "the path climbs above the root",
        PathError::DotParams => "the path has a dot segment with parameters",
    })
}

/// The upstream request's head, ready to send.
#[derive(Clone)]
struct Prepared {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// Stage 2: the upstream request's head: hop-by-hop and look-alike headers gone, forwarding
/// headers set, the upgrade offer (if any) restated, the path rewritten for the route.
fn prepare(
    parts: http::request::Parts,
    admitted: &Admitted,
    conn: &ConnInfo,
    cfg: &Config,
    offered: Option<HeaderValue>,
) -> Result<Prepared, ProxyError> {
    let trusted = cfg
        .trusted_proxies
        .iter()
        .any(|b| b.contains(conn.peer.ip()));
    let mut headers = forwarded_request_headers(
        parts.headers,
        &parts.uri,
        parts.version,
        &HeaderPolicy {
            forwarding: &conn.forwarding,
            host: &admitted.host,
            trusted,
            allow_underscores: cfg.allow_underscores_in_headers,
            client_cert: conn.client_cert.as_ref().filter(|_| admitted.mtls),
        },
    );
    if parts.method == Method::OPTIONS {
        if let Some(n) = max_forwards(&headers) {
            headers.insert(header::MAX_FORWARDS, HeaderValue::from(n.saturating_sub(1)));
        }
    }
    if let Some(up) = offered {
        headers.insert(header::UPGRADE, up);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    admitted.route.headers.request.apply(&mut headers);
    let uri: Uri = admitted
        .route
        .upstream_path(&admitted.target)
        .parse()
        .map_err(|_| ProxyError::BadRequest("malformed request target"))?;
    Ok(Prepared {
        method: parts.method,
        uri,
        headers,
    })
}

/// What decides the request headers sent upstream, besides the client's own.
pub struct HeaderPolicy<'a> {
    pub forwarding: &'a PeerForwarding,
    /// The host routed on.
    pub host: &'a str,
    /// The peer is a trusted proxy: its forwarding headers are extended, not replaced.
    pub trusted: bool,
    pub allow_underscores: bool,
    /// The verified client certificate to forward (RFC 9440), if the route's host asks for it.
    pub client_cert: Option<&'a crate::headers::ClientCertFields>,
}

/// The request-header half of `prepare`, a function of its inputs alone (and fuzzed as one):
/// hop-by-hop fields and the ones `Connection` names gone, underscore look-alikes gone, the Host
/// routed on kept, HTTP/2 cookies joined, forwarding headers set.
pub fn forwarded_request_headers(
    mut headers: HeaderMap,
    uri: &Uri,
    version: Version,
    policy: &HeaderPolicy<'_>,
) -> HeaderMap {
    // The Host sent upstream is the one routed on; a client's `Connection: host` cannot remove it.
    let host_value = match uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => headers.get(header::HOST).cloned(),
    };
    strip_hop_by_hop(&mut headers);
    crate::headers::strip_client_cert(&mut headers);
    drop_underscored(&mut headers, policy.allow_underscores);
    if let Some(v) = host_value {
        headers.insert(header::HOST, v);
    }
    if version == Version::HTTP_2 {
        join_cookies(&mut headers);
    }
    if !policy.trusted {
        // Other proxies' conventions for the same facts, which only a trusted peer may assert.
        for name in [
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-server",
        ] {
            if headers.contains_key(name) {
                headers.remove(name);
            }
        }
    }
    set_forwarded(&mut headers, policy.forwarding, policy.host, policy.trusted);
    if let Some(c) = policy.client_cert {
        headers.insert(crate::headers::CLIENT_CERT, c.cert.clone());
        if let Some(chain) = &c.chain {
            headers.insert(crate::headers::CLIENT_CERT_CHAIN, chain.clone());
        }
    }
    // A gateway MUST send Via in each request it forwards (RFC 9110 7.6.3); the received
    // protocol is the client's, the pseudonym says nothing about the host.
    let ours = match version {
        Version::HTTP_2 => "2 limen",
        Version::HTTP_10 => "1.0 limen",
        _ => "1.1 limen",
    };
    if !headers.contains_key(header::VIA) {
        headers.insert(header::VIA, HeaderValue::from_static(ours));
    } else if let Some(v) = chain(&headers, &header::VIA, ours.as_bytes()) {
        headers.insert(header::VIA, v);
    }
    headers
}

/// The response-header half of `respond` (fuzzed on its own): framing checked, hop-by-hop fields
/// gone. Ok(false): relay, but never reuse the connection.
pub fn relayed_response_headers(headers: &mut HeaderMap) -> Result<bool, &'static str> {
    let reusable = check_response_framing(headers)?;
    strip_hop_by_hop(headers);
    Ok(reusable)
}

fn count_upstream(shared: &Shared, upstream: &Arc<str>, result: &'static str) {
    shared
        .metrics
        .upstream_requests
        .get_or_create(&crate::metrics::UpstreamLabels {
            upstream: upstream.clone(),
            result,
        })
        .inc();
}

/// A request body a later try may send again is read whole first, up to this size.
pub const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// Whether a request may be sent again after a try that reached the upstream: an idempotent
/// method, no upgrade, not gRPC, and a body that is empty or small enough to keep whole.
fn replayable(
    method: &Method,
    headers: &HeaderMap,
    body_done: bool,
    upgrade: bool,
    grpc: bool,
) -> bool {
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    let small = body_done
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    idempotent && small && !upgrade && !grpc
}

/// The body of each try: the client's stream (sent once), or a copy kept whole.
enum TryBody {
    Stream(Option<RequestBody>),
    Whole(Bytes, Option<HeaderMap>),
}

impl TryBody {
    fn next(&mut self) -> Option<RequestBody> {
        match self {
            TryBody::Stream(b) => b.take(),
            TryBody::Whole(d, t) => Some(RequestBody::whole(d.clone(), t.clone())),
        }
    }
}

/// How one try ended, when it gave no response to relay.
struct TryFailure {
    error: ProxyError,
    /// The `retry.on` reason, when the failure is one (a limen-side refusal is not).
    reason: Option<crate::config::RetryReason>,
    /// The request, when no upstream took it: the next try sends it as it is.
    unsent: Option<Request<RequestBody>>,
}

impl TryFailure {
    fn new(error: ProxyError, reason: Option<crate::config::RetryReason>) -> TryFailure {
        TryFailure {
            error,
            reason,
            unsent: None,
        }
    }
}

/// Stage 3: an upstream chosen for each try (by the route's balancing, skipping ones that are
/// down or ejected), the request sent (again on a fresh connection if a pooled one turned out
/// closed before it took the request), and the response head awaited under the route's timeout,
/// which runs from the end of the request body. A try that fails in a way `retry.on` names is
/// followed by one on another upstream, within `retry.attempts` and the route's budget; after the
/// request reached an upstream, only when `replay` allows it.
#[allow(clippy::too_many_arguments)]
async fn forward(
    prepared: Prepared,
    body: RequestBody,
    group: &crate::upstream::Group,
    route: &Route,
    timeout: Duration,
    replay: bool,
    cfg: &Config,
    log: &mut AccessLog,
) -> Result<(Response<Incoming>, PooledConn, InFlight), ProxyError> {
    use crate::config::RetryReason;
    let shared = log.shared.clone();
    route.budget.note_request();
    let retry = route.retry;
    let replay = replay && retry.attempts > 0 && retry.on.after_sending();
    let mut source = if replay {
        let state = body.state.clone();
        // Boxed, as every rare path of the request's future: see `Upstream::checkout`.
        match Box::pin(body.read_whole(RETRY_BUFFER_LIMIT as usize)).await {
            Some((data, trailers)) => TryBody::Whole(data, trailers),
            None => return Err(body_fault(&state).unwrap_or(ProxyError::BodyAborted)),
        }
    } else {
        TryBody::Stream(Some(body))
    };
    // A deadline shorter than the route's is the client's (grpc-timeout): running out of it says
    // nothing about the upstream.
    let clients_deadline = timeout < route.timeout;
    let mut prepared = Some(prepared);
    // A request no upstream took (its connection closed before it was sent) goes as it is.
    let mut unsent: Option<Request<RequestBody>> = None;
    let mut tried = [0usize; 12];
    let mut tries = 0usize;
    // Re-sends of a request an upstream may have processed: bounded by `retry.attempts` and the
    // budget. A request no upstream took is not retried but failed over, within the route's
    // upstreams plus `attempts`, whatever `retry` says and without spending the budget.
    let mut retries = 0usize;
    let max_tries = retry.attempts as usize + group.members().len();
    // Every try's checkout is bounded by the request's deadline, so a black-holed upstream costs
    // a request about max(timeout, upstream_connect), however many tries it takes.
    let deadline = tokio::time::Instant::now() + timeout.max(cfg.timeouts.upstream_connect);
    let mut first_error: Option<ProxyError> = None;
    loop {
        let pick = group.pick(&tried[..tries]).ok_or(ProxyError::NoUpstream)?;
        match pick.all_down_changed {
            Some(true) => {
                tracing::warn!(route = %route.label, "every upstream of the route is down or ejected: spreading requests over all of them (fail open)")
            }
            Some(false) => {
                tracing::info!(route = %route.label, "the route has an upstream that is up again")
            }
            None => {}
        }
        tried[tries.min(tried.len() - 1)] = pick.index;
        tries += 1;
        let up = pick.upstream.clone();
        let in_flight = up.start_request();
        let last_chance = retries >= retry.attempts as usize;
        let checkout =
            tokio::time::timeout_at(deadline, up.checkout(cfg.timeouts.upstream_connect));
        let outcome = match checkout.await {
            Err(_) => {
                count_upstream(&shared, &up.authority, "connect_error");
                tracing::warn!(route = %route.label, upstream = %up.authority, "no upstream connection within the request's deadline");
                return Err(first_error.unwrap_or(ProxyError::Timeout));
            }
            Ok(Err(e)) => Err(connect_failure(&shared, route, &up, e)),
            Ok(Ok(pooled)) => {
                let req = unsent.take().or_else(|| {
                    // The head for this try; kept for the next one when a re-send may follow.
                    let head = if replay && !last_chance {
                        prepared.clone()
                    } else {
                        prepared.take()
                    };
                    Some(head?.into_request(source.next()?))
                });
                match req {
                    Some(req) => exchange(req, pooled, route, timeout, cfg, &shared).await,
                    None => Err(TryFailure::new(ProxyError::UpstreamFailed, None)),
                }
            }
        };
        log.upstream = Some(up.authority.clone());
        let mut failure = match outcome {
            Ok((resp, pooled)) => {
                let status = resp.status().as_u16();
                match RetryReason::of_status(status) {
                    None => {
                        up.health.passive_success();
                        return Ok((resp, pooled, in_flight));
                    }
                    Some(reason) => {
                        passive_failure(&shared, &up);
                        if !(replay && retry.on.has(reason) && !last_chance) {
                            return Ok((resp, pooled, in_flight));
                        }
                        if !route.budget.try_retry() {
                            budget_exhausted(&shared, route);
                            return Ok((resp, pooled, in_flight));
                        }
                        retries += 1;
                        TryFailure::new(ProxyError::UpstreamFailed, Some(reason))
                    }
                }
            }
            Err(mut f) => {
                if f.reason == Some(RetryReason::Timeout) && clients_deadline {
                    f.reason = None;
                }
                // Not the upstream's doing (the client's body or deadline, limen's own limits):
                // no retry, and the client hears the real cause.
                let Some(reason) = f.reason else {
                    return Err(f.error);
                };
                passive_failure(&shared, &up);
                if reason == RetryReason::ConnectFailure {
                    // Failover: nothing reached an upstream.
                    if tries >= max_tries || tokio::time::Instant::now() >= deadline {
                        return Err(first_error.unwrap_or(f.error));
                    }
                } else {
                    if !retry.on.has(reason) || last_chance || !replay {
                        return Err(first_error.unwrap_or(f.error));
                    }
                    if !route.budget.try_retry() {
                        budget_exhausted(&shared, route);
                        return Err(first_error.unwrap_or(f.error));
                    }
                    retries += 1;
                }
                f
            }
        };
        if let Some(reason) = failure.reason {
            shared
                .metrics
                .retries
                .get_or_create(&crate::metrics::RetryLabels {
                    route: route.label.clone(),
                    reason: reason.as_str(),
                })
                .inc();
            tracing::debug!(route = %route.label, upstream = %up.authority, reason = reason.as_str(), "trying the request again on another upstream");
        }
        unsent = failure.unsent.take();
        first_error.get_or_insert(failure.error);
    }
}

impl Prepared {
    /// The upstream request of one try, in HTTP/1.1 form (`exchange` turns it into HTTP/2 form
    /// for an HTTP/2 connection).
    fn into_request(self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}

fn budget_exhausted(shared: &Shared, route: &Route) {
    shared
        .metrics
        .retry_budget_exhausted
        .get_or_create(&crate::metrics::RouteLabel {
            route: route.label.clone(),
        })
        .inc();
}

/// Live traffic says the upstream failed; it may be ejected for it.
fn passive_failure(shared: &Shared, up: &Arc<crate::upstream::Upstream>) {
    if let Some(ejection) = up.health.passive_failure(std::time::Instant::now()) {
        shared
            .metrics
            .ejections
            .get_or_create(&crate::metrics::UpstreamLabel {
                upstream: up.authority.clone(),
            })
            .inc();
        tracing::warn!(upstream = %up.url, ?ejection, failures = up.health.passive.consecutive_failures, "upstream ejected: too many failures in a row (passive outlier detection)");
    }
}

fn connect_failure(
    shared: &Shared,
    route: &Route,
    up: &crate::upstream::Upstream,
    e: crate::upstream::ConnectError,
) -> TryFailure {
    use crate::upstream::ConnectError;
    let (result, failure) = match e.root() {
        // limen's own descriptor budget, not the upstream's fault: no retry, no ejection.
        ConnectError::Exhausted(_) => (
            "connect_error",
            TryFailure::new(ProxyError::Overloaded, None),
        ),
        ConnectError::Tls(..) => ("tls_error", connect_failed()),
        _ => ("connect_error", connect_failed()),
    };
    count_upstream(shared, &up.authority, result);
    tracing::warn!(route = %route.label, error = %e, "upstream unreachable");
    failure
}

fn connect_failed() -> TryFailure {
    TryFailure::new(
        ProxyError::NoUpstream,
        Some(crate::config::RetryReason::ConnectFailure),
    )
}

/// One try on one connection: the request sent (again on a fresh connection if the pooled one
/// was closed before it took it) and its response head awaited. A request that no connection
/// took comes back in the failure, as a connect failure: it may go to another upstream whatever
/// its method, since no upstream saw it.
async fn exchange(
    mut up_req: Request<RequestBody>,
    mut pooled: PooledConn,
    route: &Route,
    timeout: Duration,
    cfg: &Config,
    shared: &Shared,
) -> Result<(Response<Incoming>, PooledConn), TryFailure> {
    use crate::config::RetryReason;
    let body_state = up_req.body().state.clone();
    let h2_form = pooled.sender.is_h2();
    if up_req.version() == Version::HTTP_2 && !h2_form {
        // Already in HTTP/2 form from an earlier try; this upstream speaks HTTP/1.1.
        return Err(TryFailure::new(ProxyError::UpstreamFailed, None));
    }
    if h2_form && up_req.version() != Version::HTTP_2 {
        let tls = pooled.upstream().scheme == crate::config::UpstreamScheme::Https;
        to_h2_form(&mut up_req, tls).map_err(|error| TryFailure::new(error, None))?;
    }

    // An HTTP/2 upstream may refuse a stream unprocessed: REFUSED_STREAM, or a GOAWAY whose last
    // stream is below it (nginx sends one every `keepalive_requests`, servers do on shutdown),
    // and any request sent on that connection until it closes meets the same GOAWAY. A request
    // whose body is complete is kept as a copy and sent again on another connection of the same
    // upstream (RFC 9113 8.7): after REFUSED_STREAM whatever its method, after a GOAWAY only if
    // idempotent (h2 cannot tell a stream beyond the GOAWAY's last one from one it cut short).
    let mut spare = (h2_form && up_req.body().is_end_stream()).then(|| head_copy(&up_req));
    let mut refusals = 0u8;

    enum Lost {
        /// No connection took the request: here it is.
        Unsent(Box<Request<RequestBody>>, String),
        Failed(String),
    }
    /// The connection a request goes on to, or the request back unsent. It is already in the
    /// first connection's form; one that chose the other protocol by ALPN cannot take it.
    fn in_same_form(
        conn: Result<PooledConn, crate::upstream::ConnectError>,
        h2_form: bool,
        req: Request<RequestBody>,
    ) -> Result<(PooledConn, Request<RequestBody>), Lost> {
        match conn {
            Ok(c) if c.sender.is_h2() == h2_form => Ok((c, req)),
            Ok(_) => Err(Lost::Unsent(
                Box::new(req),
                "the upstream changed protocol between connections".into(),
            )),
            Err(ce) => Err(Lost::Unsent(Box::new(req), ce.to_string())),
        }
    }
    let exchange = async {
        loop {
            match pooled.sender.try_send_request(up_req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // A pooled connection the upstream closed while it sat idle hands the request
                    // back unsent; that one is safe to send again on a fresh connection.
                    Some(req) if pooled.reused => {
                        let up = pooled.upstream().clone();
                        let fresh = Box::pin(up.checkout_fresh(cfg.timeouts.upstream_connect));
                        (pooled, up_req) = in_same_form(fresh.await, h2_form, req)?;
                    }
                    Some(req) => {
                        return Err(Lost::Unsent(Box::new(req), error_chain(&e.into_error())))
                    }
                    None => {
                        let error = e.into_error();
                        let refusal = unprocessed(&error);
                        let resend = spare.take().filter(|copy| {
                            refusals < 3
                                && match refusal {
                                    Some(Refusal::Stream) => true,
                                    Some(Refusal::GoAway) => is_idempotent(copy.method()),
                                    None => false,
                                }
                        });
                        let Some(copy) = resend else {
                            return Err(Lost::Failed(error_chain(&error)));
                        };
                        refusals += 1;
                        if refusal == Some(Refusal::GoAway) {
                            pooled.retire();
                        }
                        tracing::debug!(upstream = %pooled.upstream().authority, error = %error_chain(&error), "upstream HTTP/2 stream refused unprocessed: sending it again");
                        let up = pooled.upstream().clone();
                        spare = Some(head_copy(&copy));
                        let next = up.checkout(cfg.timeouts.upstream_connect).await;
                        (pooled, up_req) = in_same_form(next, h2_form, copy)?;
                    }
                },
            }
        }
    };
    let sent = {
        tokio::pin!(exchange);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = &mut exchange => break Ok(r),
                () = &mut deadline => {
                    // The upstream gets the whole timeout from the moment the body ended.
                    let due = match body_state.ended.get() {
                        Some(ended) => *ended + timeout,
                        None if body_state.get() == BODY_OK => {
                            tokio::time::Instant::now() + timeout
                        }
                        None => break Err(()),
                    };
                    if due > tokio::time::Instant::now() {
                        deadline.as_mut().reset(due);
                        continue;
                    }
                    break Err(());
                }
            }
        }
    };
    let authority = pooled.upstream().authority.clone();
    match sent {
        Ok(Ok(resp)) => {
            count_upstream(shared, &authority, "ok");
            Ok((resp, pooled))
        }
        Ok(Err(Lost::Unsent(req, e))) => {
            count_upstream(shared, &authority, "connect_error");
            tracing::warn!(route = %route.label, upstream = %authority, error = %e, "upstream connection closed before it took the request");
            Err(TryFailure {
                error: ProxyError::UpstreamFailed,
                reason: Some(RetryReason::ConnectFailure),
                unsent: Some(*req),
            })
        }
        Ok(Err(Lost::Failed(e))) => {
            count_upstream(shared, &authority, "error");
            if let Some(fault) = body_fault(&body_state) {
                return Err(TryFailure::new(fault, None));
            }
            tracing::warn!(route = %route.label, upstream = %authority, error = %e, "upstream exchange failed");
            Err(TryFailure::new(
                ProxyError::UpstreamFailed,
                Some(RetryReason::Reset),
            ))
        }
        Err(()) => {
            count_upstream(shared, &authority, "timeout");
            tracing::warn!(route = %route.label, upstream = %authority, ?timeout, "upstream did not answer in time");
            Err(TryFailure::new(
                ProxyError::Timeout,
                Some(RetryReason::Timeout),
            ))
        }
    }
}

/// A copy of a request whose body has ended (sent again after an HTTP/2 refusal).
fn head_copy(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::whole(Bytes::new(), None));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// How an HTTP/2 upstream turned a stream away before processing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// REFUSED_STREAM: this stream only; the connection goes on.
    Stream,
    /// The upstream's GOAWAY: the connection takes no new stream.
    GoAway,
}

fn unprocessed(e: &hyper::Error) -> Option<Refusal> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(Refusal::GoAway);
            }
            return (h2.reason() == Some(h2::Reason::REFUSED_STREAM)).then_some(Refusal::Stream);
        }
        cause = c.source();
    }
    None
}

/// RFC 9110 9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An error with its causes (hyper's own message is only "http2 error"), for the log.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Stage 4: the upstream's response checked and relayed: a 101 only for an upgrade the client
/// asked for, framing checked like a client's, hop-by-hop headers gone, the body streamed with
/// the connection returned to its pool when both bodies end cleanly.
#[allow(clippy::too_many_arguments)]
fn respond(
    mut up_resp: Response<Incoming>,
    pooled: PooledConn,
    in_flight: InFlight,
    body_state: Arc<BodyState>,
    client_upgrade: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
    route: &Route,
    conn: &Arc<ConnInfo>,
    cfg: &Config,
    shared: &Shared,
    grpc: bool,
) -> Result<Response<ResponseBody>, ProxyError> {
    let authority = pooled.upstream().authority.clone();
    let refuse = |why: &str| {
        count_upstream(shared, &authority, "invalid_response");
        tracing::warn!(route = %route.label, upstream = %authority, "upstream response refused: {why}");
        ProxyError::BadUpstreamResponse
    };
    if up_resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some((client_upgrade, offered)) = client_upgrade else {
            return Err(refuse(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        };
        if !upgrade_agreed(up_resp.headers(), &offered) {
            return Err(refuse("101 names a protocol the client did not offer"));
        }
        return Ok(tunnel(
            up_resp,
            client_upgrade,
            route,
            conn.clone(),
            &cfg.timeouts,
        ));
    }
    let reusable = match relayed_response_headers(up_resp.headers_mut()) {
        Ok(r) => r,
        Err(why) => return Err(refuse(why)),
    };
    let (parts, body) = up_resp.into_parts();
    let mut resp = Response::from_parts(
        parts,
        ResponseBody {
            inner: Inner::Upstream {
                body,
                conn: reusable.then_some(pooled),
                _in_flight: in_flight,
                request_body: body_state,
                stall: None,
                // A gRPC stream's messages may be far apart: `idle` governs it, not `body_idle`.
                body_idle: if grpc {
                    cfg.timeouts.idle
                } else {
                    cfg.timeouts.body_idle
                },
                moved: false,
            },
            log: None,
            stream: None,
            rest: Bytes::new(),
        },
    );
    *resp.version_mut() = Version::HTTP_11;
    Ok(resp)
}

/// When the upstream exchange failed because of the client's body, the client hears why.
fn body_fault(state: &BodyState) -> Option<ProxyError> {
    Some(match state.get() {
        BODY_IDLE => ProxyError::BodyIdle,
        BODY_SLOW => ProxyError::BodySlow,
        BODY_TOO_LARGE => ProxyError::TooLarge,
        BODY_CLIENT_ERROR => ProxyError::BodyAborted,
        _ => return None,
    })
}

/// Hands the client a 101 and joins both upgraded connections once hyper releases them.
fn tunnel(
    up_resp: Response<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    route: &Route,
    conn: Arc<ConnInfo>,
    t: &crate::config::Timeouts,
) -> Response<ResponseBody> {
    let (idle, grace) = (t.idle, t.shutdown_grace);
    let mut shutdown = conn.shutdown.clone();
    let (parts, body) = up_resp.into_parts();
    let upstream_upgrade = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
    let label = route.label.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(route = %label, error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        // Every byte either way crosses the client socket, whose activity the connection already
        // tracks: a tunnel silent for `timeouts.idle` is closed, as nginx's proxy_read_timeout does.
        let mut tick = tokio::time::interval(
            (idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)),
        );
        let mut hard: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = &mut copy => {
                    if let Err(e) = r {
                        tracing::debug!(route = %label, error = %e, "upgraded tunnel ended");
                    }
                    break;
                }
                _ = shutdown.changed(), if hard.is_none() => {
                    hard = Some(tokio::time::Instant::now() + grace);
                }
                _ = tick.tick() => {
                    if hard.is_some_and(|h| tokio::time::Instant::now() >= h) {
                        tracing::debug!(route = %label, "upgraded tunnel still open when timeouts.shutdown_grace ran out: closing");
                        break;
                    }
                    if conn.activity.quiet_for(idle) {
                        tracing::debug!(route = %label, "upgraded tunnel idle past timeouts.idle: closing");
                        break;
                    }
                }
            }
        }
        drop(conn);
    });
    let mut resp = Response::from_parts(parts, ResponseBody::full(Bytes::new()));
    *resp.version_mut() = Version::HTTP_11;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with these routes, and a connection whose certificate covers `a.test` and
    /// `*.b.test`, from `peer`.
    fn fixture(routes: &str) -> (Snapshot, ConnInfo) {
        let text = format!(
            "listen: {{https: \"127.0.0.1:1\"}}\ntls: {{self_signed: true}}\nroutes:\n{routes}"
        );
        let config = Arc::new(Config::parse(&text, std::path::Path::new("/x.yaml")).unwrap());
        let registry = crate::upstream::UpstreamRegistry::default();
        let routes = Arc::new(crate::routing::RouteTable::build(
            &config.routes,
            Duration::from_secs(1),
            &registry,
            &crate::upstream::TlsConfigs::default(),
        ));
        let tls = crate::tls::TlsShared::new().unwrap();
        let cert = Arc::new(
            crate::tls::self_signed(&["a.test".into(), "*.b.test".into()], tls.provider()).unwrap(),
        );
        let certs = Arc::new(crate::tls::CertStore::new(vec![cert.clone()]));
        let snap = Snapshot {
            generation: 1,
            tls: crate::tls::ServerTls::plain(
                tls.server_config(certs.clone(), crate::config::TlsVersion::V12)
                    .unwrap(),
            ),
            config,
            routes,
            certs,
        };
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let permit = crate::state::ConnLimit::new(1).try_acquire().unwrap();
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let conn = ConnInfo {
            peer,
            sni: Some("a.test".into()),
            presented: Some(cert),
            forwarding: PeerForwarding::new(peer.ip()),
            client_auth: None,
            client_cert: None,
            activity: Arc::new(Activity::new()),
            shutdown,
            _permit: permit,
        };
        (snap, conn)
    }

    fn get(target: &str, host: &str) -> Request<()> {
        Request::get(target)
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    #[test]
    fn admit_refuses_in_order_host_cover_method_path_route_size() {
        let (snap, conn) = fixture(concat!(
            "  - {host: a.test, path: /app, respond: {}}\n",
            "  - {host: x.b.test, respond: {}}\n",
        ));
        let refused = |req: Request<()>| admit(&req, &conn, &snap).err();
        assert!(matches!(
            refused(get("/app", "a b")),
            Some(ProxyError::BadRequest(_))
        ));
        assert_eq!(
            refused(get("/app", "c.test")),
            Some(ProxyError::Misdirected)
        );
        let mut trace = get("/app", "a.test");
        *trace.method_mut() = Method::TRACE;
        assert_eq!(refused(trace), Some(ProxyError::MethodNotAllowed));
        assert!(matches!(
            refused(get("/app/../..", "a.test")),
            Some(ProxyError::BadRequest(_))
        ));
        assert_eq!(refused(get("/other", "a.test")), Some(ProxyError::NoRoute));
        let ok = admit(&get("/x/../app/./y?q=1", "A.test:8443"), &conn, &snap).unwrap();
        assert_eq!(ok.host, "a.test");
        assert_eq!(ok.target, "/app/y?q=1");
        assert_eq!(
            admit(&get("/", "x.b.test"), &conn, &snap).unwrap().host,
            "x.b.test"
        );
    }

    #[test]
    fn prepare_sets_forwarding_and_restates_only_real_upgrades() {
        let (snap, conn) =
            fixture("  - {host: a.test, path: /app, strip_prefix: true, respond: {}}\n");
        let mut req = get("/app/ws", "a.test");
        let h = req.headers_mut();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("upgrade, x-secret"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c, websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        let offered = offered_upgrades(&req);
        assert_eq!(offered.as_ref().unwrap(), "websocket");
        let admitted = admit(&req, &conn, &snap).unwrap();
        let (parts, ()) = req.into_parts();
        let p = prepare(parts, &admitted, &conn, &snap.config, offered).unwrap();
        assert_eq!(p.uri, "/ws");
        assert_eq!(p.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(p.headers[header::UPGRADE], "websocket");
        assert_eq!(p.headers[header::CONNECTION], "upgrade");
        assert_eq!(p.headers[header::VIA], "1.1 limen");
        assert!(p.headers.get("x-secret").is_none());
        assert!(p.headers.get("x_forwarded_for").is_none());

        let mut only_h2c = get("/app", "a.test");
        only_h2c
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        only_h2c
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(offered_upgrades(&only_h2c).is_none());
    }

    #[test]
    fn every_refusal_makes_one_plain_answer() {
        for (e, status, closes) in [
            (ProxyError::NoRoute, 404, false),
            (ProxyError::TooLarge, 413, true),
            (ProxyError::NoUpstream, 502, false),
            (ProxyError::BadUpstreamResponse, 502, true),
            (ProxyError::Timeout, 504, false),
            (ProxyError::Overloaded, 503, false),
            (ProxyError::BodyIdle, 408, true),
        ] {
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(
                r.headers().contains_key(header::CONNECTION),
                closes,
                "{e:?}"
            );
        }
        assert!(upgrade_agreed(
            &{
                let mut h = HeaderMap::new();
                h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
                h
            },
            &HeaderValue::from_static("websocket, foo")
        ));
        assert!(!upgrade_agreed(
            &HeaderMap::new(),
            &HeaderValue::from_static("websocket")
        ));
    }

    #[test]
    fn hosts_lose_ports_and_case() {
        assert_eq!(
            host_without_port("App.Test:8443").as_deref(),
            Some("app.test")
        );
        assert_eq!(host_without_port("[::1]:443").as_deref(), Some("::1"));
        assert_eq!(host_without_port("a.test").as_deref(), Some("a.test"));
        assert_eq!(host_without_port("a.test:x"), None);
        assert_eq!(host_without_port("a b"), None);
        assert_eq!(host_without_port(""), None);
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-keep").unwrap(), "1");
    }
}
