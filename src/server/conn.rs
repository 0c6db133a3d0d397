//! One TLS connection, from accept to its end: the PROXY header when its source sends one, the
//! TLS handshake with its timeout and client-certificate policy, what the handshake settled
//! (`ConnInfo`: SNI, presented certificate, client certificate), waiting for the client's first
//! bytes before hyper is set up, and serving the protocol ALPN chose with hyper's HTTP/1.1 or
//! HTTP/2 connection under the watchdog's `drive` loop.
//!
//! Must not touch: the listeners or the connection limit (`listeners`), routing and requests
//! (`proxy::handle` gets each one), the HTTP/2 streams' scheduling (`h2`) or how a parked
//! HTTP/1.1 connection waits (`parking`).

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Config;
use crate::io::Prefixed;
use crate::proxy::{self, ConnInfo};
use crate::state::{ConnPermit, Shared, Snapshot};
use crate::tls::Applied;
use crate::watch::{Activity, Watchdog};

use super::h1io::H1Io;
use super::h2::{H2Driver, StreamExecutor};
use super::listeners::proxy_header;
use super::parking::{self, unpark};
use super::watchdog::{drive, ConnIo};

pub(super) type ClientTls = tokio_rustls::server::TlsStream<ConnIo>;

/// A handshake's outcome before it is judged: the stream or rustls' error, or the deadline.
type Accepted = Result<std::io::Result<ClientTls>, tokio::time::error::Elapsed>;

pub(super) async fn serve_tls(
    mut tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    permit: ConnPermit,
) {
    let snap = shared.snapshot.load_full();
    let cfg = snap.config.clone();
    let t = &cfg.timeouts;
    // One budget from accept for everything before the first request: the PROXY header and the
    // TLS handshake together (a balancer's slow header does not buy a handshake more time).
    let deadline = tokio::time::Instant::now() + t.handshake;
    let _released = on_drop(|| {
        shared.released.fetch_add(1, Ordering::Relaxed);
    });
    let Some((peer, early)) = proxy_header(&mut tcp, peer, &cfg, &shared, true, deadline).await
    else {
        return;
    };
    let activity = Arc::new(Activity::new());
    let io = ConnIo {
        inner: Prefixed::new(early, tcp),
        activity: activity.clone(),
    };
    let Some((mut tls, applied)) = handshake(io, &snap, &shared, peer, deadline).await else {
        return;
    };
    let settled = Negotiated::read(&tls, applied, &snap);
    let h2 = settled.h2;
    drop(snap);
    if !h2 {
        // hyper's own header timer also runs while a keep-alive connection waits, which would cut
        // `idle` down to `header_read`; this watchdog times only request heads.
        activity.track_headers();
        activity.start_header_clock();
    }
    // hyper allocates 16 KiB of buffers the moment a connection is set up. A client that opened a
    // connection and sends nothing yet (preconnect) costs only the TLS state until its first
    // bytes arrive; a first request later than `header_read` (HTTP/2: `idle`) closes it, as the
    // watchdog would.
    if *shutdown.borrow() {
        return;
    }
    let first_wait = if h2 { t.idle } else { t.header_read };
    let Some(first) = first_bytes(&mut tls, first_wait, &mut shutdown).await else {
        return;
    };
    let io = Prefixed::new(first, tls);
    let info = Arc::new(settled.into_info(peer, activity, shutdown.clone(), permit));

    let open =
        shared
            .metrics
            .connections_open
            .get_or_create_owned(&crate::metrics::ProtocolLabel {
                protocol: if h2 { "h2" } else { "h1" },
            });
    open.inc();
    let _open = scopeguard_dec(open);
    // ALPN already chose the protocol, so each gets hyper's own connection type directly (no
    // protocol sniffing, no rewind buffer in front of the stream).
    if h2 {
        serve_h2(io, info, &shared, &cfg, shutdown).await;
    } else {
        serve_h1(io, info, &shared, &cfg, shutdown).await;
    }
}

/// What the handshake settled about a connection, for every request on it.
struct Negotiated {
    sni: Option<String>,
    /// The certificate the handshake presented.
    presented: Option<Arc<crate::tls::LoadedCert>>,
    client_auth: Option<(
        Arc<crate::config::ClientAuthSpec>,
        Arc<rustls::RootCertStore>,
    )>,
    client_cert: Option<crate::headers::ClientCertFields>,
    /// ALPN chose HTTP/2.
    h2: bool,
}

impl Negotiated {
    fn read(tls: &ClientTls, applied: Option<Applied>, snap: &Snapshot) -> Negotiated {
        let (_, session) = tls.get_ref();
        let sni = session.server_name().map(str::to_owned);
        // Built once per connection, only for a policy that forwards a certificate it verified.
        let client_cert = applied
            .as_ref()
            .filter(|a| a.spec.forward)
            .and(session.peer_certificates())
            .and_then(crate::headers::client_cert_fields);
        let client_auth = applied.map(|a| (a.spec, a.roots));
        let h2 = session.alpn_protocol() == Some(b"h2");
        let presented = snap.certs.select(sni.as_deref()).cloned();
        Negotiated {
            sni,
            presented,
            client_auth,
            client_cert,
            h2,
        }
    }

    fn into_info(
        self,
        peer: SocketAddr,
        activity: Arc<Activity>,
        shutdown: watch::Receiver<bool>,
        permit: ConnPermit,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            sni: self.sni,
            presented: self.presented,
            forwarding: proxy::PeerForwarding::new(peer.ip()),
            client_auth: self.client_auth,
            client_cert: self.client_cert,
            activity,
            shutdown,
            _permit: permit,
        }
    }
}

/// HTTP/2 on the connection, its streams run by `H2Driver` under the watchdog's sweep.
async fn serve_h2(
    io: Prefixed<ClientTls>,
    info: Arc<ConnInfo>,
    shared: &Arc<Shared>,
    cfg: &Config,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = info.activity.clone();
    let peer = info.peer;
    let svc_shared = shared.clone();
    let handle = move |req: http::Request<hyper::body::Incoming>| {
        proxy::handle(
            req.map(crate::body::ClientBody::Hyper),
            info.clone(),
            svc_shared.clone(),
        )
    };
    // Only HTTP/2 connections have streams to watch.
    let executor = StreamExecutor::default();
    let conn = hyper::server::conn::http2::Builder::new(executor.clone())
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        // Each stream's future boxed once: hyper and the spawn move a stream's future by
        // value, and the request's future is kilobytes (docs/performance.md).
        .serve_connection(
            TokioIo::new(io),
            service_fn(move |req| Box::pin(handle(req))),
        );
    let conn = H2Driver::new(conn, |c| c.graceful_shutdown(), &executor);
    let dog = Watchdog::connection(&activity, &cfg.timeouts, false);
    drive(
        pin!(conn),
        |c| c.graceful_shutdown(),
        dog,
        Some(&executor),
        peer,
        &mut shutdown,
    )
    .await;
}

/// HTTP/1.1 on the connection, with upgrades: one hyper connection after another, the
/// connection parked between them when it is idle (`parking`).
async fn serve_h1(
    io: Prefixed<ClientTls>,
    info: Arc<ConnInfo>,
    shared: &Arc<Shared>,
    cfg: &Config,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = info.activity.clone();
    let peer = info.peer;
    let svc_shared = shared.clone();
    let handle = move |req: http::Request<hyper::body::Incoming>| {
        proxy::handle(
            req.map(crate::body::ClientBody::Hyper),
            info.clone(),
            svc_shared.clone(),
        )
    };
    let svc = service_fn(handle);
    let mut io = io;
    let mut park = true;
    loop {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            // One buffer, so a small response (head + body) is one TLS record, sealed once.
            .writev(false)
            .max_buf_size(cfg.limits.max_header_bytes.max(8192))
            .serve_connection(TokioIo::new(H1Io::new(io, activity.clone())), svc.clone())
            .with_upgrades();
        let mut conn = conn;
        let dog = Watchdog::connection(&activity, &cfg.timeouts, park);
        let period = dog.period();
        let parked = drive(
            Pin::new(&mut conn),
            |c| c.graceful_shutdown(),
            dog,
            None,
            peer,
            &mut shutdown,
        )
        .await;
        activity.set_parking(false);
        // Upgraded (a WebSocket's socket now belongs to its tunnel) or closed: done.
        let Some((early, tls)) = parked.then(|| conn.into_parts()).flatten().map(unpark) else {
            return;
        };
        if !early.is_empty() {
            // Part of a request head hyper could not parse yet (pipelined behind the last
            // one): it began a head, so `header_read` times it, and this connection is not
            // parked again (parking would hand the same bytes back at every tick).
            activity.start_header_clock();
            park = false;
            io = Prefixed::new(early, tls);
            continue;
        }
        park = true;
        let Some(next) = parking::park(tls, &cfg.timeouts, period, shared, &mut shutdown).await
        else {
            return;
        };
        io = next;
    }
}

/// The TLS handshake under `timeouts.handshake`, counted in `limen_tls_handshakes_total`, and
/// the client-certificate policy it applied. With policies, the ClientHello is read first and its
/// SNI chooses the config; without, the default config at once (no extra step).
async fn handshake(
    io: ConnIo,
    snap: &Snapshot,
    shared: &Shared,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(ClientTls, Option<Applied>)> {
    let (accepted, applied) = if snap.tls.has_policies() {
        accept_by_sni(io, snap, shared, peer, deadline).await?
    } else {
        let acceptor = tokio_rustls::TlsAcceptor::from(snap.tls.default.clone());
        (
            tokio::time::timeout_at(deadline, acceptor.accept(io)).await,
            None,
        )
    };
    judge(accepted, applied, shared, peer)
}

/// Reads the ClientHello, then handshakes with the config (and policy) its SNI chooses. None:
/// the ClientHello failed or did not come before `deadline`.
async fn accept_by_sni(
    io: ConnIo,
    snap: &Snapshot,
    shared: &Shared,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(Accepted, Option<Applied>)> {
    let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout_at(deadline, hello).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            count_handshake(shared, "failure");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            count_handshake(shared, "timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    let (config, applied) = snap.tls.select(start.client_hello().server_name());
    let config = config.clone();
    Some((
        tokio::time::timeout_at(deadline, start.into_stream(config)).await,
        applied,
    ))
}

/// The handshake's result, counted: a `require` policy without a client certificate, rustls'
/// error (with the client-certificate refusal it names) or the timeout is None.
fn judge(
    accepted: Accepted,
    applied: Option<Applied>,
    shared: &Shared,
    peer: SocketAddr,
) -> Option<(ClientTls, Option<Applied>)> {
    match accepted {
        Ok(Ok(s)) => {
            // `require` always has a verified chain here (policy configs never resume).
            let required = applied
                .as_ref()
                .filter(|a| a.spec.mode == crate::config::ClientAuthMode::Require);
            if let Some(a) = required {
                if s.get_ref().1.peer_certificates().is_none() {
                    count_refusal(shared, a, "missing");
                    count_handshake(shared, "failure");
                    return None;
                }
            }
            count_handshake(shared, "success");
            let group = s.get_ref().1.negotiated_key_exchange_group();
            shared
                .metrics
                .tls_key_exchanges
                .get_or_create(&crate::metrics::GroupLabel {
                    group: crate::tls::group_label(group.map(|g| g.name())),
                })
                .inc();
            Some((s, applied))
        }
        Ok(Err(e)) => {
            count_handshake(shared, "failure");
            let reason = applied
                .as_ref()
                .and_then(|_| crate::tls::client_auth_refusal(&e));
            if let (Some(a), Some(r)) = (&applied, reason) {
                count_refusal(shared, a, r);
            }
            tracing::debug!(%peer, error = %e, client_auth = reason.unwrap_or("-"), "TLS handshake failed");
            None
        }
        Err(_) => {
            count_handshake(shared, "timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// One handshake in `limen_tls_handshakes_total`.
fn count_handshake(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .tls_handshakes
        .get_or_create(&crate::metrics::ResultLabel { result })
        .inc();
}

/// One refusal by a client-certificate policy in `limen_tls_client_auth_failures_total`.
fn count_refusal(shared: &Shared, a: &Applied, reason: &'static str) {
    shared
        .metrics
        .tls_client_auth_failures
        .get_or_create(&crate::metrics::ClientAuthLabels {
            host: a.host.clone(),
            reason,
        })
        .inc();
}

/// The client's first bytes after the handshake, within `wait`; None when it sends none in time,
/// closes, or shutdown begins.
pub(super) async fn first_bytes(
    tls: &mut ClientTls,
    wait: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<bytes::Bytes> {
    let mut buf = vec![0u8; 1024];
    tokio::select! {
        r = tokio::io::AsyncReadExt::read(tls, &mut buf) => match r {
            Ok(n) if n > 0 => {
                buf.truncate(n);
                Some(bytes::Bytes::from(buf))
            }
            _ => None,
        },
        () = tokio::time::sleep(wait) => None,
        _ = shutdown.changed() => None,
    }
}

/// Decrements the gauge when the connection task ends, however it ends.
fn scopeguard_dec(g: prometheus_client::metrics::gauge::Gauge) -> impl Drop {
    on_drop(move || {
        g.dec();
    })
}

/// Runs `f` when the returned guard is dropped (the task ends, however it ends).
fn on_drop<F: FnMut()>(f: F) -> impl Drop {
    struct Guard<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    Guard(f)
}
