//! Upstreams: one connection pool per upstream address, the upstream client that runs one
//! exchange over it, health, and the choice among a route's upstreams.
//!
//! - `client`: `send`, one exchange with one upstream (checkout, re-sends on one upstream,
//!   the response head, `Lease`); used by requests and health checks alike.
//! - `pool`: idle HTTP/1.1 connections, shared HTTP/2 connections under the peer's SETTINGS, and
//!   checkout with one dial in flight per upstream (single flight).
//! - `dial`: TCP, TLS, HTTP handshakes, each bounded by `upstream_connect`; `DialFailure`.
//! - `registry`: the process-wide map of pools (a reload that keeps an upstream keeps its warm
//!   connections), the descriptor budget, the idle sweep.
//! - `health`: active checks and passive outlier detection; `balance`: picking an upstream and
//!   the retry budget.
//!
//! Must not touch: request routing, client connections, the policy across upstreams (the proxy's
//! forward stage decides which upstream next and whether to retry).

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
mod dial;
mod health;
mod pool;
mod registry;
pub use balance::{Group, Member, Pick, RetryBudget, RETRY_BUDGET_FLOOR};
pub use client::{send, Deadlines, Lease, UpstreamError};
use dial::DialFlight;
pub use dial::{DialFailure, DIAL_WAITERS_MAX};
pub use health::{Health, LastCheck, State};
use pool::{H2Conn, Idle, PooledConn, Sender, StreamSlot, H2_SETTINGS_WAIT};
pub use pool::{H2_CONNECTIONS_PER_UPSTREAM, H2_STREAMS_PER_CONNECTION};
use registry::RegistryShared;
pub use registry::UpstreamRegistry;

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

/// A place in the process-wide upstream connection budget, held by a connection for its life.
type Place = Option<tokio::sync::OwnedSemaphorePermit>;

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
