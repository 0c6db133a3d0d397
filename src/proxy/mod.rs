//! The request path: from one decoded client request to a response, through the route table and an
//! upstream.
//!
//! Owns: host checks (400/421), routing (404), forwarding headers, hop-by-hop stripping, body guards
//! (size, idle, minimum rate), upstream choice and retry before sending (502), the response timeout
//! (504), protocol upgrades (WebSocket tunnels), and the access log. Reads the snapshot once per
//! request and never touches the filesystem.

mod access_log;
mod admit;
mod auth;
mod compress;
mod error;
mod forward;
mod forwarding;
mod grpc;
mod guard;
mod prepare;
mod request_id;
mod respond;
mod response_body;
mod tunnel;
#[allow(unused_imports)]
pub use access_log::*;
#[allow(unused_imports)]
pub use admit::*;
#[allow(unused_imports)]
pub use auth::*;
#[allow(unused_imports)]
pub use error::*;
#[allow(unused_imports)]
pub use forward::*;
#[allow(unused_imports)]
pub use forwarding::*;
#[allow(unused_imports)]
pub use grpc::*;
#[allow(unused_imports)]
pub use guard::*;
#[allow(unused_imports)]
pub use prepare::*;
#[allow(unused_imports)]
pub use request_id::*;
#[allow(unused_imports)]
pub use respond::*;
#[allow(unused_imports)]
pub use response_body::*;
#[allow(unused_imports)]
pub use tunnel::*;

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
use crate::body::{BodyFault, BodyState, ClientBody, RequestBody, BODY_DONE};
use crate::config::Config;
use crate::error::{ErrorKind, RequestError, Retry, Side};
use crate::headers::{
    check_response_framing, clean_trailers, drop_underscored, has_token, strip_hop_by_hop, tokens,
};
use crate::routing::{Action, Route};
use crate::state::{Shared, Snapshot};
use crate::tls::LoadedCert;
use crate::upstream::{InFlight, Lease};
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

/// Serves one request. Never fails: every problem becomes an HTTP response.
pub async fn handle(
    mut req: Request<ClientBody>,
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
    let id_header = snap.config.request_id.header.clone();
    let id = request_id(req.headers(), conn.peer.ip(), &snap.config);
    req.headers_mut().insert(id_header.clone(), id.clone());
    let trace = if enabled {
        trace_id(req.headers())
    } else {
        None
    };
    let mut log = AccessLog {
        request_id: id.clone(),
        trace_id: trace,
        client: conn.peer,
        method,
        proto: match req.version() {
            Version::HTTP_2 => "h2",
            Version::HTTP_3 => "h3",
            _ => "h1",
        },
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
    let version = req.version();
    let h2 = matches!(version, Version::HTTP_2 | Version::HTTP_3);
    let grpc = is_grpc(req.headers());
    // Every line limen logs while serving the request carries its id.
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or("-"));
    let mut resp = match tracing::Instrument::instrument(
        route_request(req, grpc, &conn, &snap, &mut log),
        span,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let kind = e.kind;
            let mut r = if grpc {
                e.into_grpc_response()
            } else {
                e.into_response()
            };
            challenge(&mut r, kind, log.route.as_deref());
            r
        }
    };
    // The route's response edits, on the upstream's answer and on limen's own alike (not on a
    // 101: its fields belong to the upgrade).
    if let Some(route) = &log.route {
        let edits = &route.headers.response;
        if !edits.is_empty() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            edits.apply(resp.headers_mut());
            // An edit of `vary` (a CORS `Vary: Origin`) must not drop what compression needs.
            if resp.body().varies {
                compress::add_vary(resp.headers_mut());
            }
        }
    }
    resp.headers_mut().insert(id_header, id);
    // Tell HTTP/1.1 and HTTP/2 clients that HTTP/3 is on offer (RFC 7838), at the port bound;
    // not on a connection under a client-certificate policy, nor on a 421 (a host under such a
    // policy named on another connection): QUIC would answer those 421, and a browser keeps an
    // Alt-Svc for a day.
    let misdirected = resp.status() == StatusCode::MISDIRECTED_REQUEST;
    if snap.config.listen.alt_svc
        && version != Version::HTTP_3
        && conn.client_auth.is_none()
        && !misdirected
    {
        let bound = shared.quic_port.load(std::sync::atomic::Ordering::Relaxed);
        let port = snap.config.listen.alt_svc_port.unwrap_or(bound);
        if bound != 0 {
            resp.headers_mut().insert(header::ALT_SVC, alt_svc(port));
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

/// `Alt-Svc` for HTTP/3 at `port`: made once per port and thread, then shared (every answer
/// carries it while `listen.quic` serves).
fn alt_svc(port: u16) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u16, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((p, v)) if *p == port => v.clone(),
            _ => {
                let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(format!(
                    "h3=\":{port}\"; ma=86400"
                )))
                .unwrap_or(HeaderValue::from_static("clear"));
                *last = Some((port, v.clone()));
                v
            }
        }
    })
}

/// The stages of one request: admit, then answer a `respond` route or prepare, forward and
/// respond. Each stage is a function of its own.
async fn route_request(
    mut req: Request<ClientBody>,
    grpc: bool,
    conn: &Arc<ConnInfo>,
    snap: &Snapshot,
    log: &mut AccessLog,
) -> Result<Response<ResponseBody>, RequestError> {
    let cfg = &*snap.config;
    let admitted = admit(&req, conn, snap)?;
    if log.enabled {
        log.host.clone_from(&admitted.host);
    }
    log.route = Some(admitted.route.clone());
    let route = &admitted.route;
    let mut authorized = None;
    if route.access.is_some() || route.rate_limit.is_some() || route.auth.is_some() {
        let client = client_address(req.headers(), conn.peer.ip(), &cfg.trusted_proxies);
        guard(route, client, req.headers(), &log.shared.metrics)?;
        if let Some(auth) = &route.auth {
            let asking = Asking {
                method: req.method(),
                uri: req.uri(),
                host: &admitted.host,
                client,
                headers: req.headers(),
            };
            match authorize(auth, route, &asking, cfg, &log.shared.metrics).await {
                Ok(a) => authorized = Some(a),
                Err(Refused::Kind(kind)) => return Err(kind.into()),
                Err(Refused::Answer(answer)) => return Ok(*answer),
            }
        }
    }
    admit_body(&req, cfg)?;
    let group = match &admitted.route.action {
        Action::Respond { status, body } => return Ok(plain(*status, body.clone())),
        Action::Redirect(_) => {
            let (status, location) =
                redirect_target(&admitted.route, "https", &admitted.host, &admitted.target).ok_or(
                    ErrorKind::BadRequest("the redirect target cannot be made for this request"),
                )?;
            return Ok(redirect_answer(status, location));
        }
        Action::Proxy(group) => group,
    };
    // OPTIONS with Max-Forwards 0 is answered here, as its final recipient (RFC 9110 7.6.2).
    if *req.method() == Method::OPTIONS && max_forwards(req.headers()) == Some(0) {
        return Ok(plain(StatusCode::OK, Bytes::new()));
    }
    let negotiated = (admitted.route.compress.as_ref())
        .map(|c| compress::negotiate(c, req.method(), req.headers()));
    let offered = offered_upgrades(&req);
    let client_upgrade = offered
        .clone()
        .map(|protocols| (hyper::upgrade::on(&mut req), protocols));
    let (parts, body) = req.into_parts();
    let prepared_h2 = matches!(parts.version, Version::HTTP_2 | Version::HTTP_3);
    let mut prepared = prepare(parts, &admitted, conn, cfg, offered)?;
    if let Some(crate::routing::RouteAuth::Forward(f)) = &admitted.route.auth {
        hand_over(&mut prepared.headers, authorized, &f.spec.response_headers);
    } else {
        hand_over(&mut prepared.headers, authorized, &[]);
    }
    // A gRPC stream's messages may be far apart, so its body is held to `timeouts.idle` only
    // when the route itself can carry such streams (HTTP/2 upstreams) and the client speaks
    // HTTP/2 or HTTP/3: a `content-type` any client can send never relaxes the slow-body defences alone.
    let streaming = grpc && prepared_h2 && admitted.route.grpc_streams;
    let body_state = Arc::new(BodyState::default());
    let body = RequestBody::new(body, cfg, body_state.clone(), streaming);
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
    let plan = Plan {
        route: &admitted.route,
        group,
        cfg,
        timeout,
        replay,
        streaming,
        negotiated,
    };
    let answered = forward(prepared, body, &plan, log).await?;
    respond(answered, client_upgrade, &plan, conn, &log.shared)
}

/// What the stages after `prepare` share about one request: its route, and what governs its
/// tries and its answer.
#[derive(Clone, Copy)]
struct Plan<'a> {
    route: &'a Route,
    group: &'a crate::upstream::Group,
    cfg: &'a Config,
    /// The wait for the response head: the route's timeout, or a shorter gRPC deadline.
    timeout: Duration,
    /// The request may be sent again after it reached an upstream (`replayable`).
    replay: bool,
    /// A gRPC stream on a route that carries them: bodies both ways are held to `timeouts.idle`.
    streaming: bool,
    /// What the client accepts, for a route with `compress`.
    negotiated: Option<compress::Negotiated>,
}

/// An upstream's response head, with the connection it came on and the request's place in the
/// upstream's in-flight count.
struct Answered {
    resp: Response<Incoming>,
    lease: Lease,
    in_flight: InFlight,
}

#[cfg(test)]
mod tests;
