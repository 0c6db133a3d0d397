//! The listeners after start: the supervisor (`Listeners`) that serves each configured listener,
//! follows every publish (a moved listener is served on the socket the reload thread bound, the
//! old one stops accepting and its connections close gracefully; the connection limit is
//! resized), stops the HTTPS and HTTP listeners at shutdown; the accept loops, with the
//! connection limit; and reading a PROXY protocol header off a fresh connection.
//!
//! Must not touch: binding sockets (start binds the first ones, the reload thread moved ones),
//! TLS or HTTP on a connection (`conn`, `redirect`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::{ConnLimit, ListenerKind, Shared};

use super::conn::serve_tls;
use super::redirect::serve_redirect;
use super::{fit_to_descriptors, fit_upstreams};

/// One listener being served: the address the config gave it, and the signal that stops it
/// accepting and closes its connections gracefully.
struct Served {
    configured: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// The QUIC listener ends by itself on `stop` (its endpoint stops taking handshakes, then
    /// waits for its connections): aborting it would skip that.
    abort: bool,
}

impl Drop for Served {
    fn drop(&mut self) {
        // Connections already accepted have their own tasks and drain on `stop`.
        let _ = self.stop.send(true);
        if self.abort {
            self.task.abort();
        }
    }
}

/// The listeners, kept as the published config says: at every publish, an added address is
/// served (the reloader bound it before publishing), a removed one stops accepting and its
/// connections close gracefully within `shutdown_grace`, and the connection limit follows
/// `limits.max_connections`.
pub(super) struct Listeners {
    shared: Arc<Shared>,
    conns: Arc<ConnLimit>,
    nofile: Option<u64>,
    served: std::collections::HashMap<ListenerKind, Served>,
    shutting_down: bool,
}

impl Listeners {
    /// Serving nothing yet; `serve` adds the listeners bound at start.
    pub(super) fn new(shared: Arc<Shared>, conns: Arc<ConnLimit>, nofile: Option<u64>) -> Self {
        Listeners {
            shared,
            conns,
            nofile,
            served: Default::default(),
            shutting_down: false,
        }
    }

    pub(super) fn serve(
        &mut self,
        kind: ListenerKind,
        configured: SocketAddr,
        listener: TcpListener,
    ) {
        let bound = listener.local_addr().ok();
        let (stop, stop_rx) = watch::channel(false);
        let task = match kind {
            ListenerKind::Admin => {
                tokio::spawn(crate::admin::serve(listener, self.shared.clone(), stop_rx))
            }
            _ => tokio::spawn(accept_loop(
                listener,
                self.shared.clone(),
                self.conns.clone(),
                stop_rx,
                kind,
            )),
        };
        {
            let mut l = crate::state::lock(&self.shared.listeners);
            match kind {
                ListenerKind::Https => {
                    l.https = bound;
                    if let Some(a) = bound {
                        self.shared.https_port.store(a.port(), Ordering::Relaxed);
                    }
                }
                ListenerKind::Http => l.http = bound,
                ListenerKind::Admin => l.admin = bound,
                ListenerKind::Quic => {}
            }
        }
        // Dropping the one it replaces stops that one.
        self.served.insert(
            kind,
            Served {
                configured,
                stop,
                task,
                abort: true,
            },
        );
    }

    /// Serves HTTP/3 on a bound UDP socket (`listen.quic`).
    pub(super) fn serve_quic(&mut self, configured: SocketAddr, socket: std::net::UdpSocket) {
        let bound = socket.local_addr().ok();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(super::quic::serve(
            socket,
            self.shared.clone(),
            self.conns.clone(),
            stop_rx,
        ));
        crate::state::lock(&self.shared.listeners).quic = bound;
        self.served.insert(
            ListenerKind::Quic,
            Served {
                configured,
                stop,
                task,
                abort: false,
            },
        );
    }

    /// Follows every publish until shutdown, then stops the HTTPS and HTTP listeners (the admin
    /// listener answers until the process exits, so readiness is seen as 503 while draining).
    pub(super) async fn supervise(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut published = self.shared.published.subscribe();
        // A publish between start and this subscription would otherwise go unseen.
        self.follow_config();
        loop {
            tokio::select! {
                r = published.changed() => {
                    if r.is_err() {
                        break;
                    }
                    self.follow_config();
                }
                _ = shutdown.changed(), if !self.shutting_down => {
                    self.shutting_down = true;
                    for kind in [ListenerKind::Https, ListenerKind::Http, ListenerKind::Quic] {
                        if let Some(s) = self.served.get(&kind) {
                            let _ = s.stop.send(true);
                        }
                    }
                }
            }
        }
        // Parked until aborted: dropping `served` here would stop the admin listener early.
        std::future::pending::<()>().await;
    }

    fn follow_config(&mut self) {
        let snap = self.shared.snapshot.load_full();
        let cfg = snap.config.clone();
        let limit = fit_to_descriptors(cfg.limits.max_connections, self.nofile);
        if limit != self.conns.limit() {
            tracing::info!(
                from = self.conns.limit(),
                to = limit,
                open = self.conns.open(),
                "connection limit changed"
            );
            self.conns.set_limit(limit);
            fit_upstreams(&self.shared.registry, self.nofile, limit);
        }
        if self.shutting_down {
            return;
        }
        let generation = snap.generation;
        // Sockets for this generation or an older one (superseded before it was seen); those
        // of a generation not yet published stay for the next round.
        let mut handoff: Vec<crate::state::Handoff> = {
            let mut h = crate::state::lock(&self.shared.handoff);
            let (now, later) = std::mem::take(&mut *h)
                .into_iter()
                .partition(|e| e.0 <= generation);
            *h = later;
            now
        };
        for (kind, want) in [
            (ListenerKind::Https, Some(cfg.listen.https)),
            (ListenerKind::Http, cfg.listen.http),
            (ListenerKind::Admin, cfg.listen.admin),
            (ListenerKind::Quic, cfg.listen.quic),
        ] {
            let have = self.served.get(&kind).map(|s| s.configured);
            if have == want {
                continue;
            }
            let Some(addr) = want else {
                tracing::info!(listener = ?kind, "listener removed: no longer accepting; its connections close within timeouts.shutdown_grace");
                self.served.remove(&kind);
                {
                    let mut l = crate::state::lock(&self.shared.listeners);
                    match kind {
                        ListenerKind::Https => l.https = None,
                        ListenerKind::Http => l.http = None,
                        ListenerKind::Admin => l.admin = None,
                        ListenerKind::Quic => {
                            l.quic = None;
                            self.shared.quic_port.store(0, Ordering::Relaxed);
                        }
                    }
                }
                continue;
            };
            let socket = handoff
                .iter()
                .position(|(_, k, a, _)| *k == kind && *a == addr)
                .map(|i| handoff.swap_remove(i).3);
            let socket = match socket {
                Some(crate::state::BoundSocket::Udp(u)) => {
                    tracing::info!(listener = ?kind, %addr, "QUIC listener moved or added: serving HTTP/3 on the new address");
                    self.serve_quic(addr, u);
                    continue;
                }
                Some(crate::state::BoundSocket::Tcp(t)) => Some(t),
                None => None,
            };
            match socket.map(TcpListener::from_std) {
                Some(Ok(l)) => {
                    tracing::info!(listener = ?kind, %addr, "listener moved: accepting on the new address; the old one's connections close within timeouts.shutdown_grace");
                    self.serve(kind, addr, l);
                }
                Some(Err(e)) => {
                    tracing::error!(listener = ?kind, %addr, error = %e, "cannot serve the new listener; the old one stays")
                }
                None => {
                    tracing::error!(listener = ?kind, %addr, "no socket was bound for the new listener; the old one stays")
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    conns: Arc<ConnLimit>,
    mut shutdown: watch::Receiver<bool>,
    kind: ListenerKind,
) {
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = conns.try_acquire() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    "limits.max_connections reached: refusing new connections"
                );
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if kind == ListenerKind::Https {
                // The permit travels with the connection, into an upgraded tunnel if there is one.
                serve_tls(tcp, peer, shared, shutdown, permit).await;
            } else {
                serve_redirect(tcp, peer, shared, shutdown).await;
                drop(permit);
            }
        });
    }
}

/// The client's address and the bytes read past its PROXY header, when this listener (`wants`)
/// expects one from `peer` (a `listen.proxy_protocol.from` source); the socket's address and
/// nothing otherwise. None: a source that had to send a header did not: close.
pub(super) async fn proxy_header(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    cfg: &crate::config::Config,
    shared: &Shared,
    wants: bool,
    deadline: tokio::time::Instant,
) -> Option<(SocketAddr, bytes::Bytes)> {
    let from = &cfg.listen.proxy_protocol_from;
    if !wants || !from.iter().any(|b| b.contains(peer.ip())) {
        return Some((peer, bytes::Bytes::new()));
    }
    match crate::proxyproto::read_header(tcp, deadline).await {
        Ok(h) => Some((h.source.unwrap_or(peer), h.rest)),
        Err(f) => {
            shared
                .metrics
                .proxy_protocol_failures
                .get_or_create(&crate::metrics::ReasonLabel { reason: f.as_str() })
                .inc();
            if warn_now(peer.ip()) {
                tracing::warn!(source = %peer.ip(), reason = f.as_str(), "connection closed: a listen.proxy_protocol.from source must start with a valid PROXY protocol header (logged at most once a minute per source)");
            }
            None
        }
    }
}

/// At most once a minute per source, so a misconfigured balancer cannot flood the log.
fn warn_now(ip: std::net::IpAddr) -> bool {
    use std::collections::HashMap;
    static LAST: std::sync::OnceLock<std::sync::Mutex<HashMap<std::net::IpAddr, Instant>>> =
        std::sync::OnceLock::new();
    let Ok(mut last) = LAST.get_or_init(Default::default).lock() else {
        return false;
    };
    let now = Instant::now();
    if last.len() > 4096 {
        last.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
    }
    match last.get(&ip) {
        Some(t) if now.duration_since(*t) < Duration::from_secs(60) => false,
        _ => {
            last.insert(ip, now);
            true
        }
    }
}
