//! Listeners and connections: binding, accepting, the TLS handshake, serving HTTP/1.1 and HTTP/2 on
//! each connection, per-connection watchdogs, and graceful shutdown.
//!
//! Owns: the process-wide `Shared` state (the published snapshot, upstream pools, TLS tickets,
//! readiness), the connection limit, and the order of shutdown (unready, delay, stop accepting,
//! drain within grace). Must not touch: files (the snapshot arrives built), routing decisions.
//!
//! This file owns starting (`start`, `start_with`: binding, the descriptor budget, the reload
//! thread), `Running` and its shutdown. The rest, by concern:
//!
//! - `listeners`: the listener supervisor that follows reloads, the accept loops, PROXY headers;
//! - `watchdog`: `ConnIo`, `Watch` and the `drive!` loop every hyper connection runs under;
//! - `conn`: one TLS connection: handshake, ALPN dispatch, serving HTTP/1.1 or HTTP/2 on it;
//! - `h2`: the HTTP/2 stream driver (`H2Driver`, `StreamExecutor`);
//! - `h1io`: the client stream under hyper's HTTP/1.1 (parking's shutdown, 414 for a long target);
//! - `parking`: parking idle HTTP/1.1 connections without their hyper buffers;
//! - `redirect`: the plain-HTTP 308 listener;
//! - `release`: giving freed memory back to the OS after connections end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::reload::{Command, LoadError, Reloader};
use crate::state::{ConnLimit, ListenerKind, Shared, Snapshot};
use crate::tls::TlsShared;
use crate::upstream::UpstreamRegistry;

mod conn;
mod h1io;
mod h2;
mod listeners;
mod parking;
pub mod quic;
mod redirect;
mod release;
mod watchdog;

pub use crate::watch::GOAWAY_GRACE;
pub use release::{RELEASE_EVERY, RELEASE_TICK};

use listeners::Listeners;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(
        "cannot bind {what} listener on {addr}: {source}; is another process using that port?"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot start the reload thread: {0}")]
    Reloader(std::io::Error),
}

/// Descriptors kept out of the connection budget: listeners, the runtime's own, the reload
/// thread's open files, logs, the admin listener's connections.
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the default soft limit of 1024 is far below
/// what a proxy needs, and only the hard limit is the operator's decision). Returns the limit in
/// force, None when unlimited or unknown.
pub fn raise_nofile() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    match (lim.current, lim.maximum) {
        (Some(cur), Some(max)) if cur < max => {
            let raised = Rlimit {
                current: Some(max),
                maximum: Some(max),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    tracing::debug!(from = cur, to = max, "raised the open-file limit");
                    Some(max)
                }
                Err(e) => {
                    tracing::warn!(soft = cur, hard = max, error = %e, "cannot raise the open-file limit to its hard limit");
                    Some(cur)
                }
            }
        }
        (Some(cur), _) => Some(cur),
        (None, _) => None,
    }
}

/// The connection limit that fits the descriptors: every client connection may need an upstream
/// connection too, so clients get half of what is left after `RESERVED_FDS`. Client connections
/// then run out first (new ones are refused at accept), while the connections inside can still
/// reach their upstreams.
pub fn fit_to_descriptors(max_connections: usize, nofile: Option<u64>) -> usize {
    let Some(limit) = nofile else {
        return max_connections;
    };
    let fit = usize::try_from(limit.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if max_connections > fit {
        // A fact about the environment, not about this reload: said once per distinct value
        // (start and every publish ask again).
        static WARNED: std::sync::Mutex<Option<(usize, u64)>> = std::sync::Mutex::new(None);
        let mut warned = crate::state::lock(&WARNED);
        if *warned == Some((max_connections, limit)) {
            return fit;
        }
        *warned = Some((max_connections, limit));
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            reserved = RESERVED_FDS,
            using = fit,
            "limits.max_connections does not fit the open-file limit (each client connection may hold an upstream connection too): using {fit}; raise the hard limit (ulimit -Hn, LimitNOFILE=) to allow more"
        );
        return fit;
    }
    max_connections
}

/// A running proxy: its bound addresses and the means to stop it.
pub struct Running {
    pub shared: Arc<Shared>,
    /// Where the listeners were bound at start; `shared.listeners` follows later moves.
    pub https_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// UDP: HTTP/3.
    pub quic_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    conns: Arc<ConnLimit>,
    tasks: Vec<JoinHandle<()>>,
    /// Dropping it stops the reload thread.
    reload: Option<std::sync::mpsc::Sender<Command>>,
}

/// Loads the config at `path` with every certificate, binds every listener, and starts serving.
/// The config file is then watched for changes, with every certificate it names.
pub async fn start(path: &std::path::Path) -> Result<Running, StartError> {
    let tls = TlsShared::new()?;
    let registry = UpstreamRegistry::default();
    let mut reloader = Reloader::new(path);
    let snapshot = reloader.initial_load(&tls, &registry)?;
    start_with(snapshot, tls, registry, Some(reloader)).await
}

/// Serves an already built snapshot; with a reloader, keeps it up to date with the files.
pub async fn start_with(
    snapshot: Snapshot,
    tls: TlsShared,
    registry: UpstreamRegistry,
    reloader: Option<Reloader>,
) -> Result<Running, StartError> {
    let cfg = snapshot.config.clone();
    let bind = |what: &'static str, addr: SocketAddr| {
        crate::reload::bind_listener(addr)
            .and_then(TcpListener::from_std)
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let https = bind("https", cfg.listen.https)?;
    let http = cfg.listen.http.map(|a| bind("http", a)).transpose()?;
    let admin = cfg.listen.admin.map(|a| bind("admin", a)).transpose()?;
    let quic = cfg
        .listen
        .quic
        .map(|addr| {
            crate::reload::bind_udp(addr).map_err(|source| StartError::Bind {
                what: "quic",
                addr,
                source,
            })
        })
        .transpose()?;
    let quic_addr = quic.as_ref().and_then(|s| s.local_addr().ok());
    let local = |l: &TcpListener| l.local_addr().ok();
    let https_addr = local(&https).unwrap_or(cfg.listen.https);
    let http_addr = http.as_ref().and_then(local);
    let admin_addr = admin.as_ref().and_then(local);

    let nofile = raise_nofile();
    let max_conns = fit_to_descriptors(cfg.limits.max_connections, nofile);
    fit_upstreams(&registry, nofile, max_conns);
    let shared = Arc::new(Shared::new(snapshot, tls, registry));
    // Before any listener serves: the admin API is never open for a moment when a token is set.
    if let Some(r) = &reloader {
        shared.admin_token.store(r.admin_token());
        r.announce(&shared);
    }
    let reload = match reloader {
        Some(r) => {
            let (tx, rx) = std::sync::mpsc::channel();
            crate::reload::spawn(r, shared.clone(), rx).map_err(StartError::Reloader)?;
            Some(tx)
        }
        None => None,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    shared.registry.start_checkers(
        tokio::runtime::Handle::current(),
        shutdown_rx.clone(),
        shared.metrics.health_checks.clone(),
    );
    let conns = ConnLimit::new(max_conns);
    let mut listeners = Listeners::new(shared.clone(), conns.clone(), nofile);
    listeners.serve(ListenerKind::Https, cfg.listen.https, https);
    if let (Some(a), Some(l)) = (cfg.listen.http, http) {
        listeners.serve(ListenerKind::Http, a, l);
    }
    if let (Some(a), Some(l)) = (cfg.listen.admin, admin) {
        listeners.serve(ListenerKind::Admin, a, l);
    }
    if let (Some(a), Some(s)) = (cfg.listen.quic, quic) {
        listeners.serve_quic(a, s);
    }
    let tasks = vec![tokio::spawn(listeners.supervise(shutdown_rx))];
    shared.ready.store(true, Ordering::Relaxed);
    let shown = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
    tracing::info!(https = %https_addr, http = %shown(http_addr), admin = %shown(admin_addr), "limen is serving");
    Ok(Running {
        shared,
        https_addr,
        http_addr,
        admin_addr,
        quic_addr,
        shutdown,
        conns,
        tasks,
        reload,
    })
}

/// Upstream connections get what clients and the reserve leave: they never take the
/// descriptors the accept loop needs, and new clients are the ones refused when they run short.
fn fit_upstreams(registry: &UpstreamRegistry, nofile: Option<u64>, max_conns: usize) {
    if let Some(limit) = nofile {
        let upstream = limit.saturating_sub(RESERVED_FDS) as usize;
        registry.limit_connections(upstream.saturating_sub(max_conns));
    }
}

impl Running {
    /// Graceful shutdown: unready at once, keep accepting for `shutdown_delay`, stop accepting,
    /// then wait up to `shutdown_grace` for open connections to finish. True when all finished.
    pub async fn shutdown(self) -> bool {
        self.shared.ready.store(false, Ordering::Relaxed);
        let t = self.shared.snapshot.load().config.timeouts.clone();
        tracing::info!(delay = ?t.shutdown_delay, grace = ?t.shutdown_grace, "shutting down: readiness off");
        tokio::time::sleep(t.shutdown_delay).await;
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(t.shutdown_grace, self.conns.drained())
            .await
            .is_ok();
        for task in &self.tasks {
            task.abort();
        }
        if drained {
            tracing::info!("all connections finished");
        } else {
            tracing::warn!("shutdown grace ran out with connections still open; closing them");
        }
        drained
    }

    /// Asks the reloader to poll now instead of at the next interval (SIGHUP).
    pub fn reload_now(&self) {
        if let Some(tx) = &self.reload {
            let _ = tx.send(Command::Poll);
        }
    }
}
