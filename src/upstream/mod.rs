//! Upstreams: one connection pool per upstream address, and round-robin choice within a route.
//!
//! Owns: dialling upstreams (with the connect timeout), keeping idle HTTP/1.1 connections for reuse
//! (only a connection whose request and response both ended cleanly is reused), and one shared,
//! multiplexed HTTP/2 connection per `h2c://` upstream, kept alive by PINGs and replaced when it
//! dies or says GOAWAY.
//! Pools live in a process-wide registry keyed by address, so a reload that keeps an upstream keeps
//! its warm connections. Must not touch: request routing, client connections.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::RequestBody;
use crate::config::{HealthCheck, Passive, UpstreamScheme};

mod balance;
pub mod client;
mod health;
pub use balance::{Group, Member, Pick, RetryBudget, RETRY_BUDGET_FLOOR};
pub use client::{send, Deadlines, Lease, UpstreamError};
pub use health::{Health, LastCheck, State};

/// Idle connections older than this are closed rather than reused; upstream servers commonly
/// time out idle keep-alive connections after 60s or more, so 30s stays safely inside.
/// Idle connections kept per upstream.
const POOL_MAX_IDLE: usize = 512;

/// HTTP/2 upstream keep-alive until a config sets it (`timeouts.upstream_ping_interval` and
/// `upstream_ping_timeout` have the same defaults).
const H2_PING_DEFAULT: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(20));

/// The client configs of the `upstream_tls` blocks in force, built by the reloader from their
/// files.
pub type TlsConfigs = HashMap<crate::config::UpstreamTls, Arc<rustls::ClientConfig>>;

/// What dialling an `https://` upstream needs.
#[derive(Clone)]
pub struct UpstreamTlsDial {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// Speak HTTP/2 whatever ALPN says (`upstream_protocol: h2`).
    pub force_h2: bool,
}

/// The request side of one upstream connection.
enum Sender {
    H1(http1::SendRequest<RequestBody>),
    /// A clone of the upstream's shared HTTP/2 connection.
    H2(http2::SendRequest<RequestBody>),
}

impl Sender {
    /// Sends the request; a request the connection did not take (it was closed before) comes
    /// back with the error, so it can be sent again elsewhere.
    pub async fn try_send_request(
        &mut self,
        req: http::Request<RequestBody>,
    ) -> Result<
        http::Response<hyper::body::Incoming>,
        hyper::client::conn::TrySendError<http::Request<RequestBody>>,
    > {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }
}

/// Why a dial failed: the cause inside a request error (`classify` makes it one).
#[derive(Debug, thiserror::Error)]
pub enum DialFailure {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0} failed: {1}")]
    Io(String, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(String, hyper::Error),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    #[error("no descriptor left for a new connection to {0} within the connect timeout (the upstream connection budget is in use)")]
    Exhausted(String),
    /// The dial this request waited for, shared with the others that waited.
    #[error("{0}")]
    Shared(Arc<DialFailure>),
    #[error("{0} more requests already wait for a connection to {1}")]
    TooManyWaiting(usize, String),
}

impl DialFailure {
    /// The failure itself, whether this request dialled or waited for another's dial.
    pub fn root(&self) -> &DialFailure {
        match self {
            DialFailure::Shared(e) => e.root(),
            other => other,
        }
    }

    /// The request error it is, with the `result` label of `limen_upstream_requests_total`.
    /// Nothing reached the upstream, so the request fails over; except when limen's own
    /// descriptor budget is what failed, which is neither the upstream's fault nor cured by
    /// another upstream.
    fn classify(self) -> (&'static str, crate::error::RequestError) {
        use crate::error::{ErrorKind, RequestError};
        match self.root() {
            DialFailure::Exhausted(_) => (
                "connect_error",
                RequestError::new(ErrorKind::Overloaded).because(self),
            ),
            DialFailure::Tls(..) => ("tls_error", RequestError::unsent(self)),
            _ => ("connect_error", RequestError::unsent(self)),
        }
    }
}

/// The outcome of a shared dial, as every waiter sees it.
type DialOutcome = Option<Result<(), Arc<DialFailure>>>;

/// A dial for a shared HTTP/2 connection, run by a task of its own (it finishes, bounded by
/// `upstream_connect`, even when the requests that wanted it are gone) and watched by its waiters.
type DialFlight = tokio::sync::watch::Receiver<DialOutcome>;

/// Requests that may wait for one upstream's dial in flight; more fail at once (the upstream is
/// not answering, and a queue would only hold their memory and their clients).
pub const DIAL_WAITERS_MAX: usize = 1024;

/// A place in the process-wide upstream connection budget, held by a connection for its life.
type Place = Option<tokio::sync::OwnedSemaphorePermit>;

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
    _place: Place,
}

/// One upstream address and its pool.
pub struct Upstream {
    /// The label of logs and metrics (`host:port` for `http://`, `h2c://host:port`); shared,
    /// since every request is labelled with it.
    pub authority: Arc<str>,
    /// `host:port`, as dialled.
    pub addr: Arc<str>,
    /// The URL as the config wrote it (normalized), for the status page.
    pub url: Arc<str>,
    pub scheme: UpstreamScheme,
    /// `https://`: the client config and the name sent and verified.
    tls: Option<UpstreamTlsDial>,
    /// HTTP/1.1: idle connections, oldest first.
    idle: Mutex<VecDeque<Idle>>,
    /// HTTP/2: the shared connection, while it lives.
    /// HTTP/2: the live connections, each with its streams in flight; a new one is opened when
    /// every one carries as many as the upstream allows, or `limits.upstream_h2_streams`.
    h2: Mutex<Vec<H2Conn>>,
    /// The dial in flight for a shared HTTP/2 connection, if any: everyone who finds no room
    /// waits for it and gets its result (single flight), instead of taking a turn to dial.
    dialing: Mutex<Option<DialFlight>>,
    /// Dials started (each a TCP connect, then TLS and HTTP handshakes): shown in /status.json.
    dials: AtomicUsize,
    /// Requests waiting for the dial in flight.
    dial_waiters: AtomicUsize,
    /// `https://`: what ALPN chose last (0: not known yet, 1: HTTP/1.1, 2: HTTP/2).
    alpn: AtomicUsize,
    registry: Arc<RegistryShared>,
    /// Active checks and passive outlier detection.
    pub health: Health,
    /// Requests on their way or being answered now (least_request reads it).
    in_flight: AtomicUsize,
}

/// A request counted in its upstream's `in_flight` while it lives.
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish()
    }
}

/// A connection checked out of a pool, ready for one request.
struct PooledConn {
    sender: Sender,
    upstream: Arc<Upstream>,
    reused: bool,
    place: Place,
    /// HTTP/2: this request's stream, counted on its connection until the exchange ends.
    _stream: Option<StreamSlot>,
}

/// One shared HTTP/2 connection and the streams it carries now.
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    streams: Arc<AtomicUsize>,
    /// The peer's SETTINGS, as its frames passed.
    peer: Arc<crate::io::PeerSettings>,
}

impl H2Conn {
    /// Whether it takes one more stream now: ready, and below both the peer's limit and limen's
    /// own cap (`limits.upstream_h2_streams`), so no request queues inside a connection.
    fn has_room(&self, cap: usize) -> bool {
        let limit = cap.min(self.peer.max_streams.load(Ordering::Relaxed).max(1));
        self.sender.is_ready() && self.streams.load(Ordering::Relaxed) < limit
    }
}

/// How long a new upstream HTTP/2 connection waits for the server's first SETTINGS frame.
const H2_SETTINGS_WAIT: Duration = Duration::from_secs(1);

/// Streams on one upstream HTTP/2 connection, by default (`limits.upstream_h2_streams`).
pub const H2_STREAMS_PER_CONNECTION: usize = crate::config::UPSTREAM_H2_STREAMS;

/// HTTP/2 connections to one upstream, by default (`limits.upstream_h2_connections`).
pub const H2_CONNECTIONS_PER_UPSTREAM: usize = crate::config::UPSTREAM_H2_CONNECTIONS;

/// A request counted among those waiting for a dial; uncounted when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream counted on its connection; uncounted when dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn take(streams: &Arc<AtomicUsize>) -> StreamSlot {
        streams.fetch_add(1, Ordering::Relaxed);
        StreamSlot(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PooledConn {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// HTTP/2: no new stream goes to this connection any more (the upstream said GOAWAY; hyper
    /// reports it closed only once its last stream ends).
    fn retire(&self) {
        let Some(slot) = &self._stream else {
            return;
        };
        if let Ok(mut conns) = self.upstream.h2.lock() {
            conns.retain(|c| !Arc::ptr_eq(&c.streams, &slot.0));
        }
    }

    /// Puts the connection back for reuse; call only when the exchange ended cleanly. An HTTP/2
    /// connection is shared and stays with its upstream whatever happens to one stream.
    fn release(self) {
        let Sender::H1(sender) = self.sender else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.upstream.idle.lock() {
            if idle.len() < POOL_MAX_IDLE {
                idle.push_back(Idle {
                    sender,
                    since: Instant::now(),
                    _place: self.place,
                });
            }
        }
    }
}

impl Upstream {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in `in_flight` until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn new(
        url: &crate::config::UpstreamUrl,
        tls: Option<UpstreamTlsDial>,
        health: Health,
        registry: Arc<RegistryShared>,
    ) -> Upstream {
        Upstream {
            health,
            in_flight: AtomicUsize::new(0),
            authority: url.label().into(),
            addr: url.authority.as_str().into(),
            url: url.to_string().into(),
            tls,
            scheme: url.scheme,
            idle: Mutex::new(VecDeque::new()),
            h2: Mutex::new(Vec::new()),
            dialing: Mutex::new(None),
            dials: AtomicUsize::new(0),
            dial_waiters: AtomicUsize::new(0),
            alpn: AtomicUsize::new(0),
            registry,
        }
    }

    /// Drops the idle connections past `timeouts.upstream_idle` or closed by the upstream, with
    /// their buffers: without traffic, nothing else would.
    fn expire_idle(&self) {
        let max = self.registry.pool_idle();
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|c| c.since.elapsed() < max && !c.sender.is_closed());
        }
    }

    /// The most recently used idle connection (the warmest, the least likely to have been closed
    /// by the upstream); expired ones are dropped from the cold end.
    fn take_idle(&self) -> Option<(http1::SendRequest<RequestBody>, Place)> {
        let max = self.registry.pool_idle();
        let mut idle = self.idle.lock().ok()?;
        while idle
            .front()
            .is_some_and(|c| c.since.elapsed() >= max || c.sender.is_closed())
        {
            idle.pop_front();
        }
        while let Some(c) = idle.pop_back() {
            if !c.sender.is_closed() {
                return Some((c.sender, c._place));
            }
        }
        None
    }

    /// A pooled connection ready now, without waiting or dialling: a stream on a shared HTTP/2
    /// connection with room, or the warmest idle HTTP/1.1 connection if it is ready. The common
    /// case, taken before any timer is armed for the request's deadline.
    fn checkout_now(self: &Arc<Self>) -> Option<PooledConn> {
        let maybe_h2 = match self.scheme {
            UpstreamScheme::Http => false,
            UpstreamScheme::H2c => true,
            UpstreamScheme::Https => self.alpn.load(Ordering::Relaxed) != 1,
        };
        if maybe_h2 {
            return self.shared_h2();
        }
        let mut idle = self.idle.lock().ok()?;
        let warm = idle.back()?;
        if warm.since.elapsed() >= self.registry.pool_idle() || !warm.sender.is_ready() {
            return None;
        }
        let c = idle.pop_back()?;
        Some(PooledConn {
            sender: Sender::H1(c.sender),
            upstream: self.clone(),
            reused: true,
            place: c._place,
            _stream: None,
        })
    }

    /// A ready connection: an idle one if there is one, else a new one.
    async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, DialFailure> {
        let maybe_h2 = match self.scheme {
            UpstreamScheme::Http => false,
            UpstreamScheme::H2c => true,
            UpstreamScheme::Https => self.alpn.load(Ordering::Relaxed) != 1,
        };
        if maybe_h2 {
            if let Some(c) = self.shared_h2() {
                return Ok(c);
            }
            // h2c, or https whose ALPN said h2 (or has not said yet): one dial for everyone.
            // None: ALPN chose HTTP/1.1, and the connection is one's own, below.
            if let Some(c) = Box::pin(self.checkout_shared(connect_timeout)).await? {
                return Ok(c);
            }
        }
        // A released connection becomes ready once its task has seen the exchange end, which
        // is a moment; most are ready already and need no timer. One bound for all the waiting.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        while let Some((mut sender, place)) = self.take_idle() {
            if sender.is_ready()
                || matches!(
                    tokio::time::timeout_at(deadline, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                return Ok(PooledConn {
                    sender: Sender::H1(sender),
                    upstream: self.clone(),
                    reused: true,
                    place,
                    _stream: None,
                });
            }
        }
        // Boxed: a dial's future (TCP connect, TLS handshake, HTTP/2 handshake) is kilobytes,
        // and inline it would be part of every request's future, moved at each spawn and poll
        // wrapper, though most requests find a pooled connection.
        Box::pin(self.checkout_fresh(connect_timeout)).await
    }

    /// A stream on a shared HTTP/2 connection, after waiting for (or starting) the one dial in
    /// flight. None: the upstream chose HTTP/1.1, so connections are not shared.
    async fn checkout_shared(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<Option<PooledConn>, DialFailure> {
        let waiting = self.dial_waiters.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.dial_waiters);
        if waiting >= DIAL_WAITERS_MAX {
            return Err(DialFailure::TooManyWaiting(
                waiting,
                self.authority.to_string(),
            ));
        }
        // A few rounds: the connection a dial opened may fill up before this request gets to
        // it, and then another dial is due. The caller's deadline bounds it all.
        for _ in 0..4 {
            let mut flight = self.join_dial(connect_timeout);
            let outcome = flight
                .wait_for(Option::is_some)
                .await
                .map(|o| o.clone())
                .ok()
                .flatten();
            // None: the dialling task ended without a word (it panicked), so the next round
            // dials again.
            if let Some(Err(e)) = outcome {
                return Err(DialFailure::Shared(e));
            }
            if let Some(c) = self.shared_h2() {
                return Ok(Some(c));
            }
            if self.scheme == UpstreamScheme::Https && self.alpn.load(Ordering::Relaxed) == 1 {
                return Ok(None);
            }
        }
        // Each new connection filled up before this request got a stream on it: one of its own.
        self.checkout_fresh(connect_timeout).await.map(Some)
    }

    /// The dial in flight, or a new one started on a task of its own.
    fn join_dial(self: &Arc<Self>, connect_timeout: Duration) -> DialFlight {
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = dialing.as_ref().filter(|f| f.borrow().is_none()) {
            return flight.clone();
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        *dialing = Some(rx.clone());
        drop(dialing);
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = match me.checkout_fresh(connect_timeout).await {
                // The new connection goes where the waiters look: an HTTP/2 one is in `h2`
                // already (this stream slot is given back), an HTTP/1.1 one joins the idle pool.
                Ok(conn) => {
                    conn.release();
                    Ok(())
                }
                Err(e) => Err(Arc::new(e)),
            };
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// Dials started to this upstream.
    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }

    /// A live HTTP/2 connection with room for one more stream, if there is one.
    fn shared_h2(self: &Arc<Self>) -> Option<PooledConn> {
        // Closed ones are skipped here (not ready) and swept when a connection is added, not at
        // every request.
        let conns = self.h2.lock().ok()?;
        let (cap, most) = self.registry.h2_limits();
        let c = match conns.iter().find(|c| c.has_room(cap)) {
            Some(c) => c,
            // As many connections as allowed, all full: the least busy one queues the stream.
            None if conns.iter().filter(|c| c.sender.is_ready()).count() >= most => conns
                .iter()
                .filter(|c| c.sender.is_ready())
                .min_by_key(|c| c.streams.load(Ordering::Relaxed))?,
            None => return None,
        };
        Some(PooledConn {
            sender: Sender::H2(c.sender.clone()),
            upstream: self.clone(),
            reused: true,
            place: None,
            _stream: Some(StreamSlot::take(&c.streams)),
        })
    }

    /// A new connection, never a pooled one.
    async fn checkout_fresh(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, DialFailure> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let place = self
            .registry
            .place(connect_timeout)
            .await
            .ok_or_else(|| DialFailure::Exhausted(self.authority.to_string()))?;
        let stream = match tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect(&*self.addr),
        )
        .await
        {
            Err(_) => return Err(DialFailure::Timeout(self.authority.to_string())),
            Ok(Err(e)) => return Err(DialFailure::Io(self.authority.to_string(), e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None if self.scheme == UpstreamScheme::Https => Err(DialFailure::Tls(
                self.authority.to_string(),
                "its upstream_tls settings did not load".into(),
            )),
            None if self.scheme == UpstreamScheme::H2c => self.start_h2(stream, place).await,
            None => self.start_h1(stream, place).await,
            Some(dial) => {
                let connector = tokio_rustls::TlsConnector::from(dial.config.clone());
                let tls = match tokio::time::timeout(
                    connect_timeout,
                    connector.connect(dial.server_name.clone(), stream),
                )
                .await
                {
                    Err(_) => return Err(DialFailure::Timeout(self.authority.to_string())),
                    Ok(Err(e)) => {
                        return Err(DialFailure::Tls(self.authority.to_string(), tls_reason(&e)))
                    }
                    Ok(Ok(t)) => t,
                };
                let h2 = dial.force_h2 || tls.get_ref().1.alpn_protocol() == Some(b"h2");
                self.alpn.store(if h2 { 2 } else { 1 }, Ordering::Relaxed);
                if h2 {
                    self.start_h2(tls, place).await
                } else {
                    self.start_h1(tls, place).await
                }
            }
        }
    }

    /// An HTTP/2 connection over `io`, shared by every request to this upstream until it closes.
    async fn start_h2<T>(self: &Arc<Self>, io: T, place: Place) -> Result<PooledConn, DialFailure>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let label = self.authority.clone();
        // The socket holds the descriptor's place: hyper runs it in a task of its own, which
        // outlives the connection future on GOAWAY while streams finish.
        let peer = Arc::new(crate::io::PeerSettings::default());
        let io = crate::io::H2Settings::new(crate::io::Guarded::new(io, place), peer.clone());
        let (interval, timeout) = self.registry.h2_keepalive();
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| DialFailure::Handshake(self.authority.to_string(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %label, error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        // The server's SETTINGS come first on the connection, within its first round trip:
        // waited for, so the streams this connection is offered for respect its limit. Bounded:
        // a server that never says is taken to allow `limits.upstream_h2_streams`.
        let _ = tokio::time::timeout(H2_SETTINGS_WAIT, peer.seen.notified()).await;
        let streams = Arc::new(AtomicUsize::new(0));
        let slot = StreamSlot::take(&streams);
        if let Ok(mut conns) = self.h2.lock() {
            conns.retain(|c| !c.sender.is_closed());
            conns.push(H2Conn {
                sender: sender.clone(),
                streams,
                peer,
            });
        }
        Ok(PooledConn {
            sender: Sender::H2(sender),
            upstream: self.clone(),
            reused: false,
            place: None,
            _stream: Some(slot),
        })
    }

    /// An HTTP/1.1 connection over `io`, pooled when its exchanges end cleanly.
    async fn start_h1<T>(self: &Arc<Self>, io: T, place: Place) -> Result<PooledConn, DialFailure>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let label = self.authority.clone();
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| DialFailure::Handshake(self.authority.to_string(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %label, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(PooledConn {
            sender: Sender::H1(sender),
            upstream: self.clone(),
            reused: false,
            place,
            _stream: None,
        })
    }
}

/// Process-wide map from address to pool. Holds weak references: an upstream that no snapshot
/// uses any more is dropped with its idle connections.
#[derive(Default)]
pub struct UpstreamRegistry {
    shared: Arc<RegistryShared>,
}

#[derive(Default)]
struct RegistryShared {
    map: Mutex<HashMap<String, Weak<Upstream>>>,
    /// The descriptors upstream connections may use, all pools together; unset: no limit.
    budget: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
    /// PING interval and timeout of new HTTP/2 upstream connections; unset: the defaults.
    h2_keepalive: Mutex<Option<(Duration, Duration)>>,
    /// Set once serving starts: health checkers run from then on (never under `--check`).
    runner: std::sync::OnceLock<health::Runner>,
    /// `timeouts.upstream_idle` in milliseconds; 0: unset (30 s).
    pool_idle_ms: std::sync::atomic::AtomicU64,
    /// `limits.upstream_h2_streams` and `upstream_h2_connections`; 0: unset (the defaults).
    h2_streams: AtomicUsize,
    h2_connections: AtomicUsize,
}

/// Every sixth of `timeouts.upstream_idle`, expires the idle connections of every live upstream,
/// so a pool that filled during a burst gives its connections (and their memory) back within
/// that time plus a sixth once traffic stops, as checkouts do while traffic goes on.
async fn sweep_idle(
    shared: Weak<RegistryShared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let Some(every) = shared
            .upgrade()
            .map(|s| (s.pool_idle() / 6).clamp(Duration::from_millis(20), Duration::from_secs(10)))
        else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let live: Vec<Arc<Upstream>> = match shared.map.lock() {
            Ok(map) => map.values().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        for up in live {
            up.expire_idle();
        }
    }
}

impl RegistryShared {
    /// Streams per HTTP/2 connection and connections per upstream, at most.
    fn h2_limits(&self) -> (usize, usize) {
        let or = |v: usize, d: usize| if v == 0 { d } else { v };
        (
            or(
                self.h2_streams.load(Ordering::Relaxed),
                H2_STREAMS_PER_CONNECTION,
            ),
            or(
                self.h2_connections.load(Ordering::Relaxed),
                H2_CONNECTIONS_PER_UPSTREAM,
            ),
        )
    }

    fn pool_idle(&self) -> Duration {
        match self.pool_idle_ms.load(Ordering::Relaxed) {
            0 => Duration::from_secs(30),
            ms => Duration::from_millis(ms),
        }
    }

    fn h2_keepalive(&self) -> (Duration, Duration) {
        self.h2_keepalive
            .lock()
            .ok()
            .and_then(|k| *k)
            .unwrap_or(H2_PING_DEFAULT)
    }

    /// A place for one more upstream connection: at once if the budget has room, else after
    /// closing the coldest idle connection of any pool, else the first freed within `wait`.
    /// Some(None): no budget is set. None: none came free in time.
    async fn place(&self, wait: Duration) -> Option<Place> {
        let Some(budget) = self.budget.get() else {
            return Some(None);
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(p) = budget.clone().try_acquire_owned() {
                return Some(Some(p));
            }
            if self.evict_coldest_idle() {
                continue;
            }
            // Every place is held by a connection in use; a released one goes back to its pool
            // with its place (it frees none), so look again shortly rather than only waiting.
            let tick = (tokio::time::Instant::now() + Duration::from_millis(10)).min(deadline);
            if let Ok(Ok(p)) = tokio::time::timeout_at(tick, budget.clone().acquire_owned()).await {
                return Some(Some(p));
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Closes the idle connection that has waited longest, across every pool. False: none idle.
    fn evict_coldest_idle(&self) -> bool {
        let Ok(map) = self.map.lock() else {
            return false;
        };
        let coldest = map
            .values()
            .filter_map(Weak::upgrade)
            .filter_map(|up| {
                let since = up.idle.lock().ok()?.front()?.since;
                Some((since, up))
            })
            .min_by_key(|(since, _)| *since);
        drop(map);
        match coldest {
            Some((_, up)) => up.idle.lock().is_ok_and(|mut q| q.pop_front().is_some()),
            None => false,
        }
    }
}

impl UpstreamRegistry {
    /// The pool of `url` (with these TLS settings): the one already known, with its warm
    /// connections, else a new one.
    /// The health settings are part of the upstream's identity: the same ones keep its state and
    /// its checker across reloads, different ones start afresh.
    pub fn get(
        &self,
        url: &crate::config::UpstreamUrl,
        tls: Option<UpstreamTlsDial>,
        check: Option<&HealthCheck>,
        passive: Passive,
    ) -> Arc<Upstream> {
        // A pool holds its client config, so the config's address names it uniquely while the
        // pool lives: new TLS material (a rotated CA) gets a new pool, the old one goes with
        // the last snapshot that uses it.
        let key = match &tls {
            Some(t) => format!(
                "{}#{:p}#{:?}#{}",
                url.label(),
                Arc::as_ptr(&t.config),
                t.server_name,
                t.force_h2
            ),
            None => url.label(),
        };
        let key = match check {
            Some(c) => format!("{key}#{c:?}#{passive:?}"),
            None => format!("{key}#{passive:?}"),
        };
        let new = |tls| {
            let health = Health::new(check.cloned(), passive);
            Arc::new(Upstream::new(url, tls, health, self.shared.clone()))
        };
        let Ok(mut map) = self.shared.map.lock() else {
            return new(tls);
        };
        if let Some(up) = map.get(&key).and_then(Weak::upgrade) {
            return up;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let up = new(tls);
        map.insert(key, Arc::downgrade(&up));
        drop(map);
        if let Some(runner) = self.shared.runner.get() {
            health::start_checker(&up, runner);
        }
        up
    }

    /// From now on every upstream with a health check has its checker running (those known
    /// already start now), on `handle`, until `shutdown` turns true or the upstream is dropped.
    pub fn start_checkers(
        &self,
        handle: tokio::runtime::Handle,
        shutdown: tokio::sync::watch::Receiver<bool>,
        checks: health::CheckCounter,
    ) {
        let runner = health::Runner {
            handle,
            shutdown,
            checks,
        };
        let sweep = (runner.handle.clone(), runner.shutdown.clone());
        if self.shared.runner.set(runner).is_err() {
            return;
        }
        sweep
            .0
            .spawn(sweep_idle(Arc::downgrade(&self.shared), sweep.1));
        let known: Vec<Arc<Upstream>> = match self.shared.map.lock() {
            Ok(map) => map.values().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        if let Some(runner) = self.shared.runner.get() {
            for up in &known {
                health::start_checker(up, runner);
            }
        }
    }

    /// The PING keep-alive of HTTP/2 upstream connections opened from now on (connections already
    /// open keep theirs: hyper fixes it at the handshake).
    pub fn set_h2_keepalive(&self, interval: Duration, timeout: Duration) {
        if let Ok(mut k) = self.shared.h2_keepalive.lock() {
            *k = Some((interval, timeout));
        }
    }

    /// How long a pooled HTTP/1.1 upstream connection may stay unused (`timeouts.upstream_idle`).
    /// `limits.upstream_h2_streams` and `limits.upstream_h2_connections`, for the next checkout.
    pub fn set_h2_limits(&self, streams: usize, connections: usize) {
        self.shared.h2_streams.store(streams, Ordering::Relaxed);
        self.shared
            .h2_connections
            .store(connections, Ordering::Relaxed);
    }

    pub fn set_pool_idle(&self, idle: Duration) {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared.pool_idle_ms.store(ms, Ordering::Relaxed);
    }

    /// Caps the upstream connections of every pool together at `n` (set once, at start, from the
    /// open-file limit). A dial over the cap first closes the coldest idle connection, then waits
    /// for a place within its connect timeout.
    pub fn limit_connections(&self, n: usize) {
        let _ = self
            .shared
            .budget
            .set(Arc::new(tokio::sync::Semaphore::new(n.max(1))));
    }
}

/// Why a TLS handshake with an upstream failed, in the words an operator looks for.
fn tls_reason(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "certificate verification failed: unknown issuer (check upstream_tls.ca)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "certificate verification failed: name mismatch (check upstream_tls.server_name)"
                    .into()
            }
            C::Expired | C::ExpiredContext { .. } => {
                "certificate verification failed: expired".into()
            }
            other => format!("certificate verification failed: {other:?}"),
        },
        other => other.to_string(),
    }
}

impl UpstreamTlsDial {
    /// The dial settings of `url` under a route's `upstream_tls`, from the configs in force.
    pub fn for_url(
        url: &crate::config::UpstreamUrl,
        settings: &crate::config::UpstreamTls,
        configs: &TlsConfigs,
    ) -> Option<UpstreamTlsDial> {
        let config = configs.get(settings)?.clone();
        let name = settings
            .server_name
            .clone()
            .unwrap_or_else(|| url.host().to_string());
        let server_name = rustls_pki_types::ServerName::try_from(name).ok()?;
        Some(UpstreamTlsDial {
            config,
            server_name,
            force_h2: settings.protocol == crate::config::UpstreamProtocol::H2,
        })
    }
}
