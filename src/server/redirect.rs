//! The plain-HTTP redirect listener's connections (`listen.http`): HTTP/1.1 only, under the same
//! watchdog as HTTPS ones (a `ConnIo` under hyper, no TLS), every request answered with
//! `308 Permanent Redirect` to the same host and path on https, or 400 when Host is missing or
//! malformed.
//!
//! Must not touch: TLS, routing, or upstreams; it never proxies.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::io::Prefixed;
use crate::proxy;
use crate::state::Shared;
use crate::watch::{Activity, Watchdog};

use super::h1io::H1Io;
use super::listeners::proxy_header;
use super::watchdog::{drive, ConnIo};

pub(super) async fn serve_redirect(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = shared.snapshot.load().config.clone();
    // Where HTTPS is now, unless the config names the port clients see.
    let port = cfg.listen.redirect_port.unwrap_or_else(|| {
        match shared.https_port.load(Ordering::Relaxed) {
            0 => cfg.listen.https.port(),
            p => p,
        }
    });
    let mut tcp = tcp;
    let wants = cfg.listen.http_proxy_protocol;
    // The same watchdog as the HTTPS listener's: request heads within `header_read`, `idle`,
    // `write_idle`, and the shutdown grace. The head's clock starts at accept: a PROXY header
    // comes out of the same `header_read`.
    let activity = Arc::new(Activity::new());
    activity.track_headers();
    activity.start_header_clock();
    let deadline = tokio::time::Instant::now() + cfg.timeouts.header_read;
    let Some((peer, early)) = proxy_header(&mut tcp, peer, &cfg, &shared, wants, deadline).await
    else {
        return;
    };
    let io = ConnIo {
        inner: Prefixed::new(early, tcp),
        activity: activity.clone(),
    };
    let counted = activity.clone();
    let svc_shared = shared.clone();
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        counted.request_started();
        let resp =
            route_redirect(&req, &svc_shared).unwrap_or_else(|| redirect_response(&req, port));
        counted.request_finished();
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // The same bound on a head as on the HTTPS listener: a path is echoed into Location.
        .max_buf_size(cfg.limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(H1Io::new(io, activity.clone())), svc);
    let dog = Watchdog::connection(&activity, &cfg.timeouts, false);
    drive(
        pin!(conn),
        |c| c.graceful_shutdown(),
        dog,
        None,
        peer,
        &mut shutdown,
    )
    .await;
}

/// A route's own `redirect`, answered here at once (one hop, not two): the route the request
/// would take over HTTPS, when it is a redirect route. `{scheme}` is `http` here.
fn route_redirect(
    req: &http::Request<hyper::body::Incoming>,
    shared: &Shared,
) -> Option<http::Response<http_body_util::Full<bytes::Bytes>>> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(proxy::host_without_port)?;
    let snap = shared.snapshot.load();
    let path =
        crate::normalize::normalize_path(req.uri().path(), snap.config.escaped_slashes).ok()?;
    let route = snap
        .routes
        .lookup(&host, &path, &crate::routing::Facts::of(req))?;
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let (status, location) = proxy::redirect_target(route, "http", &host, &target)?;
    let mut r = http::Response::new(http_body_util::Full::from(format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::LOCATION, location);
    Some(r)
}

/// 308 to the same host and path on https. The host comes from the request, so it is checked
/// before it is echoed into a Location header.
fn redirect_response(
    req: &http::Request<hyper::body::Incoming>,
    port: u16,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http::{header, Response, StatusCode};
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(proxy::host_without_port);
    let Some(host) = host else {
        let mut r = Response::new(http_body_util::Full::from(
            "400 Bad Request: missing or malformed Host header\n",
        ));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let mut r = Response::new(http_body_util::Full::from(format!(
        "308 Permanent Redirect: {location}\n"
    )));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = http::HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}
