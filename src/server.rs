//! Listeners and connections: binding, accepting, the TLS handshake, serving HTTP/1.1 and HTTP/2 on
//! each connection, per-connection watchdogs, and graceful shutdown.
//!
//! Owns: the process-wide `Shared` state (the published snapshot, upstream pools, TLS tickets,
//! readiness), the connection limit, and the order of shutdown (unready, delay, stop accepting,
//! drain within grace). Must not touch: files (the snapshot arrives built), routing decisions.

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::io::Prefixed;
use crate::proxy::{self, ConnInfo};
use crate::reload::{Command, LoadError, Reloader};
use crate::state::{ConnLimit, ConnPermit, ListenerKind, Shared, Snapshot};
use crate::tls::TlsShared;
use crate::upstream::UpstreamRegistry;
use crate::watch::{Activity, StreamClock};

/// The client socket, instrumented for the watchdog. Sits under TLS, so every byte is seen.
struct ConnIo {
    /// With the bytes read past a PROXY header, if there was one.
    inner: Prefixed<TcpStream>,
    activity: Arc<Activity>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let a = &self.activity;
            a.touched();
            // Bytes between requests begin the next request head (slowloris defence).
            if a.tracks_headers() && a.inflight.load(Ordering::Relaxed) == 0 {
                a.start_header_clock();
            }
        }
        r
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl ConnIo {
    fn note_write(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(_) => self.activity.wrote(),
        }
    }
}

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
    let mut listeners = Listeners {
        shared: shared.clone(),
        conns: conns.clone(),
        nofile,
        served: Default::default(),
        shutting_down: false,
    };
    listeners.serve(ListenerKind::Https, cfg.listen.https, https);
    if let (Some(a), Some(l)) = (cfg.listen.http, http) {
        listeners.serve(ListenerKind::Http, a, l);
    }
    if let (Some(a), Some(l)) = (cfg.listen.admin, admin) {
        listeners.serve(ListenerKind::Admin, a, l);
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
        shutdown,
        conns,
        tasks,
        reload,
    })
}

/// How often the memory releaser looks at connection churn.
pub const RELEASE_TICK: Duration = Duration::from_secs(1);
/// Under steady churn (connections ending every second), memory is released this often.
pub const RELEASE_EVERY: Duration = Duration::from_secs(10);

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

    /// Calls `release` (the allocator's "give free pages back to the OS": glibc's `malloc_trim`)
    /// after TLS connections ended or parked, so that a burst's buffers do not stay in RSS once
    /// it is over. glibc returns memory on its own only from the top of a heap, and a burst's
    /// per-connection buffers are spread through it. Checked every [`RELEASE_TICK`]: called
    /// when connections ended or parked since the last call and either none did in the last
    /// tick (the churn settled) or [`RELEASE_EVERY`] passed (steady churn). A busy keep-alive
    /// load, with no connection ending, never calls it, and neither does an idle process.
    pub fn release_memory_with(&mut self, release: fn()) {
        let shared = self.shared.clone();
        let mut shutdown = self.shutdown.subscribe();
        self.tasks.push(tokio::spawn(async move {
            let count = || shared.released.load(Ordering::Relaxed);
            let (mut at_release, mut at_tick) = (count(), count());
            let mut last = Instant::now();
            let mut tick = tokio::time::interval(RELEASE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let now = count();
                let settled = now == at_tick;
                at_tick = now;
                if now == at_release || !(settled || last.elapsed() >= RELEASE_EVERY) {
                    continue;
                }
                at_release = now;
                last = Instant::now();
                release();
                tracing::debug!(took = ?last.elapsed(), "freed memory given back to the OS");
            }
        }));
    }

    /// Asks the reloader to poll now instead of at the next interval (SIGHUP).
    pub fn reload_now(&self) {
        if let Some(tx) = &self.reload {
            let _ = tx.send(Command::Poll);
        }
    }
}

/// One listener being served: the address the config gave it, and the signal that stops it
/// accepting and closes its connections gracefully.
struct Served {
    configured: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        // Connections already accepted have their own tasks and drain on `stop`.
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// The listeners, kept as the published config says: at every publish, an added address is
/// served (the reloader bound it before publishing), a removed one stops accepting and its
/// connections close gracefully within `shutdown_grace`, and the connection limit follows
/// `limits.max_connections`.
struct Listeners {
    shared: Arc<Shared>,
    conns: Arc<ConnLimit>,
    nofile: Option<u64>,
    served: std::collections::HashMap<ListenerKind, Served>,
    shutting_down: bool,
}

impl Listeners {
    fn serve(&mut self, kind: ListenerKind, configured: SocketAddr, listener: TcpListener) {
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
            }
        }
        // Dropping the one it replaces stops that one.
        self.served.insert(
            kind,
            Served {
                configured,
                stop,
                task,
            },
        );
    }

    /// Follows every publish until shutdown, then stops the HTTPS and HTTP listeners (the admin
    /// listener answers until the process exits, so readiness is seen as 503 while draining).
    async fn supervise(mut self, mut shutdown: watch::Receiver<bool>) {
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
                    for kind in [ListenerKind::Https, ListenerKind::Http] {
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
                    }
                }
                continue;
            };
            let socket = handoff
                .iter()
                .position(|(_, k, a, _)| *k == kind && *a == addr)
                .map(|i| handoff.swap_remove(i).3);
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

// ---- HTTP/2 streams under watch ----

type StreamFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs each HTTP/2 stream of one connection inside the connection's own task (`H2Driver`), with
/// a clock the watchdog reads and a cancel it can pull.
#[derive(Clone, Default)]
struct StreamExecutor {
    streams: Arc<std::sync::Mutex<Vec<std::sync::Weak<StreamClock>>>>,
    /// Streams hyper handed over since the driver last took them.
    started: Arc<std::sync::Mutex<Vec<StreamFuture>>>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let clock = Arc::new(StreamClock::new());
        if let Ok(mut list) = self.streams.lock() {
            if list.len() >= 64 && list.len().is_power_of_two() {
                list.retain(|w| w.strong_count() > 0);
            }
            list.push(Arc::downgrade(&clock));
        }
        let (fut, abort) = futures_util::future::abortable(StreamClock::scope(clock.clone(), fut));
        clock.set_task(abort);
        if let Ok(mut started) = self.started.lock() {
            started.push(Box::pin(async move {
                let _ = fut.await;
            }));
        }
    }
}

/// An HTTP/2 connection and its streams, polled in one task: a stream's wake-up polls the
/// connection's task, and no stream costs a task of its own (docs/performance.md). Ends with the
/// connection; streams still running then are dropped (h2 has failed them by then).
struct H2Driver<C> {
    conn: Pin<Box<C>>,
    /// hyper's `graceful_shutdown` of the connection (its bounds are the caller's to prove).
    shutdown: fn(Pin<&mut C>),
    running: futures_util::stream::FuturesUnordered<StreamFuture>,
    started: Arc<std::sync::Mutex<Vec<StreamFuture>>>,
}

impl<C> H2Driver<C> {
    fn new(conn: C, shutdown: fn(Pin<&mut C>), executor: &StreamExecutor) -> H2Driver<C> {
        H2Driver {
            conn: Box::pin(conn),
            shutdown,
            running: futures_util::stream::FuturesUnordered::new(),
            started: executor.started.clone(),
        }
    }

    fn graceful_shutdown(mut self: Pin<&mut Self>) {
        let shutdown = self.shutdown;
        shutdown(self.conn.as_mut());
    }
}

impl<C: std::future::Future> std::future::Future for H2Driver<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        use futures_util::StreamExt;
        let this = &mut *self;
        loop {
            let done = this.conn.as_mut().poll(cx);
            let (mut added, mut polled) = (false, false);
            // Streams started while streams were polled (hyper's executor is theirs to call
            // too) are taken in the same turn: nothing else would wake this task for them.
            loop {
                let started = match this.started.lock() {
                    Ok(mut s) => std::mem::take(&mut *s),
                    Err(_) => Vec::new(),
                };
                if started.is_empty() && polled {
                    break;
                }
                added |= !started.is_empty();
                this.running.extend(started);
                while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {}
                polled = true;
            }
            if let Poll::Ready(out) = done {
                return Poll::Ready(out);
            }
            // New streams may have queued their first frames: the connection writes them now.
            if !added {
                return Poll::Pending;
            }
        }
    }
}

impl StreamExecutor {
    /// Cancels every stream whose body has waited on the client's window for `limit`. True when
    /// streams are open and every one of them is stalled: the connection should close.
    fn sweep(&self, limit: Duration) -> bool {
        let Ok(mut list) = self.streams.lock() else {
            return false;
        };
        list.retain(|w| w.strong_count() > 0);
        let (mut open, mut stalled) = (0usize, 0usize);
        for clock in list.iter().filter_map(std::sync::Weak::upgrade) {
            if clock.is_cancelled() {
                continue;
            }
            open += 1;
            if clock.stalled_for(limit) {
                stalled += 1;
                clock.cancel();
            }
        }
        open > 0 && stalled == open
    }
}

/// An HTTP/2 connection whose GOAWAY the client ignores (it never answers the PING that ends a
/// graceful shutdown) is closed this long after the GOAWAY once no stream is in flight.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(2);

/// What a connection's watchdog checks, and against which limits.
struct Watch<'a> {
    activity: &'a Activity,
    t: &'a crate::config::Timeouts,
    peer: SocketAddr,
    /// HTTP/2: the connection's streams.
    streams: Option<&'a StreamExecutor>,
}

impl Watch<'_> {
    fn period(&self) -> Duration {
        [self.t.idle, self.t.write_idle]
            .into_iter()
            .min()
            .unwrap_or(Duration::from_secs(1))
            .div_f32(4.0)
            .clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// Drives one hyper connection (HTTP/1.1 or HTTP/2: two types with the same methods; `$conn` is
/// it pinned) to its end, under the watchdog and the shutdown signal. With `park` true, an
/// HTTP/1.1 connection found idle and quiet at a tick is ended without closing the socket
/// (`H1Io`), and the macro's value is true: the caller then holds the bare TLS stream until the
/// client's next bytes.
macro_rules! drive {
    ($conn:expr, $watch:expr, $shutdown:expr) => {
        drive!($conn, $watch, $shutdown, false)
    };
    ($conn:expr, $watch:expr, $shutdown:expr, $park:expr) => {{
        let w = $watch;
        let peer = w.peer;
        let park: bool = $park;
        let mut parking = false;
        let mut conn = $conn;
        let mut tick = tokio::time::interval(w.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the graceful close began, and when it must be over whatever the client does.
        let mut closing: Option<(Instant, Option<Instant>)> = None;
        if *$shutdown.borrow() {
            conn.as_mut().graceful_shutdown();
            closing = Some((Instant::now(), Some(Instant::now() + w.t.shutdown_grace)));
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                        parking = false;
                    }
                    break;
                }
                _ = $shutdown.changed(), if closing.map_or(true, |(_, hard)| hard.is_none()) => {
                    if closing.is_none() {
                        conn.as_mut().graceful_shutdown();
                    }
                    let began = closing.map_or_else(Instant::now, |(b, _)| b);
                    closing = Some((began, Some(Instant::now() + w.t.shutdown_grace)));
                }
                _ = tick.tick() => {
                    if w.activity.write_stuck_for(w.t.write_idle) {
                        tracing::debug!(%peer, "client stopped reading for timeouts.write_idle: closing");
                        break;
                    }
                    if w.activity.headers_late(w.t.header_read) {
                        tracing::debug!(%peer, "request head not complete within timeouts.header_read: closing");
                        break;
                    }
                    if w.streams.is_some_and(|s| s.sweep(w.t.write_idle)) {
                        tracing::debug!(%peer, "every HTTP/2 stream waited on the client's flow-control window for timeouts.write_idle: closing");
                        break;
                    }
                    match closing {
                        None if park
                            && !parking
                            && w.activity.inflight.load(Ordering::Relaxed) == 0
                            && !w.activity.headers_pending()
                            && w.activity.quiet_for(w.period()) =>
                        {
                            // Idle between requests for a whole tick: hyper ends the connection
                            // at once (it is between messages), the socket stays open, and its
                            // buffers (16 KiB and the request slot) go back until the next bytes.
                            parking = true;
                            w.activity.set_parking(true);
                            conn.as_mut().graceful_shutdown();
                        }
                        None => {
                            if w.activity.idle_for(w.t.idle) {
                                closing = Some((Instant::now(), None));
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                        Some((_, Some(hard))) if Instant::now() >= hard => {
                            tracing::debug!(%peer, "still open when timeouts.shutdown_grace ran out: closing");
                            break;
                        }
                        Some((began, _)) => {
                            if began.elapsed() >= GOAWAY_GRACE
                                && w.activity.inflight.load(Ordering::Relaxed) == 0
                            {
                                tracing::debug!(%peer, "the client did not finish the graceful close: closing");
                                break;
                            }
                        }
                    }
                }
            }
        }
        parking
    }};
}

async fn serve_tls(
    mut tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    permit: ConnPermit,
) {
    let snap = shared.snapshot.load_full();
    let cfg = snap.config.clone();
    let t = &cfg.timeouts;
    let _released = on_drop(|| {
        shared.released.fetch_add(1, Ordering::Relaxed);
    });
    let Some((peer, early)) = proxy_header(&mut tcp, peer, &cfg, &shared, true).await else {
        return;
    };
    let activity = Arc::new(Activity::new());
    let io = ConnIo {
        inner: Prefixed::new(early, tcp),
        activity: activity.clone(),
    };
    let Some((mut tls, applied)) = handshake(io, &snap, &shared, peer).await else {
        return;
    };
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
    let info = Arc::new(ConnInfo {
        peer,
        sni,
        presented,
        forwarding: proxy::PeerForwarding::new(peer.ip()),
        client_auth,
        client_cert,
        activity: activity.clone(),
        shutdown: shutdown.clone(),
        _permit: permit,
    });

    let open =
        shared
            .metrics
            .connections_open
            .get_or_create_owned(&crate::metrics::ProtocolLabel {
                protocol: if h2 { "h2" } else { "h1" },
            });
    open.inc();
    let _open = scopeguard_dec(open);
    let svc_shared = shared.clone();
    let handle = move |req| proxy::handle(req, info.clone(), svc_shared.clone());
    // Only HTTP/2 connections have streams to watch.
    let streams = h2.then(StreamExecutor::default);
    let watch = Watch {
        activity: &activity,
        t,
        peer,
        streams: streams.as_ref(),
    };
    // ALPN already chose the protocol, so each gets hyper's own connection type directly (no
    // protocol sniffing, no rewind buffer in front of the stream).
    if h2 {
        let executor = streams.clone().unwrap_or_default();
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
        drive!(pin!(conn), watch, shutdown);
    } else {
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
                .serve_connection(
                    TokioIo::new(H1Io {
                        inner: io,
                        activity: activity.clone(),
                    }),
                    svc.clone(),
                )
                .with_upgrades();
            let mut conn = conn;
            let parked = drive!(Pin::new(&mut conn), &watch, shutdown, park);
            activity.set_parking(false);
            // Upgraded (a WebSocket's socket now belongs to its tunnel) or closed: done.
            let Some((early, mut tls)) = parked.then(|| conn.into_parts()).flatten().map(unpark)
            else {
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
            let wait = t.idle.saturating_sub(watch.period());
            shared.metrics.connections_parked.inc();
            shared.released.fetch_add(1, Ordering::Relaxed);
            let next = next_request(&mut tls, wait, t.header_read, &mut shutdown).await;
            shared.metrics.connections_parked.dec();
            let Some(first) = next else {
                // Idle for `idle`, shutdown, or the client closed: close as hyper would.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::io::AsyncWriteExt::shutdown(&mut tls),
                )
                .await;
                return;
            };
            io = Prefixed::new(first, tls);
        }
    }
}

/// What a parked HTTP/1.1 connection keeps of hyper's: the TLS stream, and the bytes hyper had
/// read but not parsed yet, then any it had not read. Everything else of hyper's is dropped
/// here, on return: an empty `read_buf` still owns hyper's 8 KiB read buffer, and kept in the
/// caller's scope it would stay for the whole park.
fn unpark<S>(
    parts: hyper::server::conn::http1::Parts<TokioIo<H1Io>, S>,
) -> (bytes::Bytes, ClientTls) {
    let (rest, tls) = parts.io.into_inner().inner.into_parts();
    let early = if parts.read_buf.is_empty() {
        rest
    } else if rest.is_empty() {
        // Copied out of hyper's buffer: a few bytes must not hold 8 KiB.
        bytes::Bytes::copy_from_slice(&parts.read_buf)
    } else {
        [parts.read_buf, rest].concat().into()
    };
    (early, tls)
}

/// The client stream of an HTTP/1.1 connection under hyper. While it is being parked, hyper's
/// closing `shutdown` only flushes: the socket and its TLS session stay for the next request.
struct H1Io {
    inner: Prefixed<ClientTls>,
    activity: Arc<Activity>,
}

impl AsyncRead for H1Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for H1Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.activity.parking() {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A parked connection's next request: waits on the socket itself (no buffer is held while the
/// client is silent; rustls has none buffered, as hyper found nothing more to read), up to
/// `wait`; then its first bytes within `header_read`. None: nothing in time, closed, or shutdown.
async fn next_request(
    tls: &mut ClientTls,
    wait: Duration,
    header_read: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<bytes::Bytes> {
    tokio::select! {
        r = tls.get_ref().0.inner.get_ref().readable() => r.ok()?,
        () = tokio::time::sleep(wait) => return None,
        _ = shutdown.changed() => return None,
    }
    first_bytes(tls, header_read, shutdown).await
}

type ClientTls = tokio_rustls::server::TlsStream<ConnIo>;

/// The client's address and the bytes read past its PROXY header, when this listener (`wants`)
/// expects one from `peer` (a `listen.proxy_protocol.from` source); the socket's address and
/// nothing otherwise. None: a source that had to send a header did not: close.
async fn proxy_header(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    cfg: &crate::config::Config,
    shared: &Shared,
    wants: bool,
) -> Option<(SocketAddr, bytes::Bytes)> {
    let from = &cfg.listen.proxy_protocol_from;
    if !wants || !from.iter().any(|b| b.contains(peer.ip())) {
        return Some((peer, bytes::Bytes::new()));
    }
    match crate::proxyproto::read_header(tcp, cfg.timeouts.handshake).await {
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

/// The TLS handshake under `timeouts.handshake`, counted in `limen_tls_handshakes_total`, and
/// the client-certificate policy it applied. With policies, the ClientHello is read first and its
/// SNI chooses the config; without, the default config at once (no extra step).
async fn handshake(
    io: ConnIo,
    snap: &Snapshot,
    shared: &Shared,
    peer: SocketAddr,
) -> Option<(ClientTls, Option<crate::tls::Applied>)> {
    let handshakes = |result: &'static str| {
        shared
            .metrics
            .tls_handshakes
            .get_or_create(&crate::metrics::ResultLabel { result })
            .inc();
    };
    let deadline = tokio::time::Instant::now() + snap.config.timeouts.handshake;
    let (accepted, applied) = if snap.tls.has_policies() {
        let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = match tokio::time::timeout_at(deadline, hello).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                handshakes("failure");
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                handshakes("timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
                return None;
            }
        };
        let (config, applied) = snap.tls.select(start.client_hello().server_name());
        let config = config.clone();
        (
            tokio::time::timeout_at(deadline, start.into_stream(config)).await,
            applied,
        )
    } else {
        let acceptor = tokio_rustls::TlsAcceptor::from(snap.tls.default.clone());
        (
            tokio::time::timeout_at(deadline, acceptor.accept(io)).await,
            None,
        )
    };
    let refused = |a: &crate::tls::Applied, reason: &'static str| {
        shared
            .metrics
            .tls_client_auth_failures
            .get_or_create(&crate::metrics::ClientAuthLabels {
                host: a.host.clone(),
                reason,
            })
            .inc();
    };
    match accepted {
        Ok(Ok(s)) => {
            // `require` always has a verified chain here (policy configs never resume).
            let required = applied
                .as_ref()
                .filter(|a| a.spec.mode == crate::config::ClientAuthMode::Require);
            if let Some(a) = required {
                if s.get_ref().1.peer_certificates().is_none() {
                    refused(a, "missing");
                    handshakes("failure");
                    return None;
                }
            }
            handshakes("success");
            Some((s, applied))
        }
        Ok(Err(e)) => {
            handshakes("failure");
            let reason = applied
                .as_ref()
                .and_then(|_| crate::tls::client_auth_refusal(&e));
            if let (Some(a), Some(r)) = (&applied, reason) {
                refused(a, r);
            }
            tracing::debug!(%peer, error = %e, client_auth = reason.unwrap_or("-"), "TLS handshake failed");
            None
        }
        Err(_) => {
            handshakes("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// The client's first bytes after the handshake, within `wait`; None when it sends none in time,
/// closes, or shutdown begins.
async fn first_bytes(
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

async fn serve_redirect(
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
    let Some((peer, early)) = proxy_header(&mut tcp, peer, &cfg, &shared, wants).await else {
        return;
    };
    // The same watchdog as the HTTPS listener's: request heads within `header_read`, `idle`,
    // `write_idle`, and the shutdown grace.
    let activity = Arc::new(Activity::new());
    activity.track_headers();
    activity.start_header_clock();
    let io = ConnIo {
        inner: Prefixed::new(early, tcp),
        activity: activity.clone(),
    };
    let counted = activity.clone();
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        counted.request_started();
        let resp = redirect_response(&req, port);
        counted.request_finished();
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), svc);
    let watch = Watch {
        activity: &activity,
        t: &cfg.timeouts,
        peer,
        streams: None,
    };
    drive!(pin!(conn), watch, shutdown);
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
