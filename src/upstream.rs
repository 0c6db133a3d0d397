//! Upstreams: one connection pool per upstream address, and round-robin choice within a route.
//!
//! Owns: dialling upstreams (with the connect timeout), keeping idle HTTP/1.1 connections for reuse,
//! and the rule that only a connection whose request and response both ended cleanly is reused.
//! Pools live in a process-wide registry keyed by address, so a reload that keeps an upstream keeps
//! its warm connections. Must not touch: request routing, client connections.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::proxy::RequestBody;

/// Idle connections older than this are closed rather than reused; upstream servers commonly
/// time out idle keep-alive connections after 60s or more, so 30s stays safely inside.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream.
const POOL_MAX_IDLE: usize = 512;

type Sender = http1::SendRequest<RequestBody>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0} failed: {1}")]
    Io(String, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(String, hyper::Error),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One upstream address and its pool.
pub struct Upstream {
    /// `host:port`; shared, since logs and metrics label requests with it.
    pub authority: Arc<str>,
    /// Oldest first.
    idle: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish()
    }
}

/// A connection checked out of a pool, ready for one request.
pub struct PooledConn {
    pub sender: Sender,
    upstream: Arc<Upstream>,
    pub reused: bool,
}

impl PooledConn {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Puts the connection back for reuse; call only when the exchange ended cleanly.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.upstream.idle.lock() {
            if idle.len() < POOL_MAX_IDLE {
                idle.push_back(Idle {
                    sender: self.sender,
                    since: Instant::now(),
                });
            }
        }
    }
}

impl Upstream {
    fn new(authority: Arc<str>) -> Upstream {
        Upstream {
            authority,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// The most recently used idle connection (the warmest, the least likely to have been closed
    /// by the upstream); expired ones are dropped from the cold end.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        while idle
            .front()
            .is_some_and(|c| c.since.elapsed() >= POOL_IDLE || c.sender.is_closed())
        {
            idle.pop_front();
        }
        while let Some(c) = idle.pop_back() {
            if !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    /// A ready connection: an idle one if there is one, else a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, ConnectError> {
        // A released connection becomes ready once its task has seen the exchange end, which
        // is a moment; most are ready already and need no timer. One bound for all the waiting.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        while let Some(mut sender) = self.take_idle() {
            if sender.is_ready()
                || matches!(
                    tokio::time::timeout_at(deadline, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                return Ok(PooledConn {
                    sender,
                    upstream: self.clone(),
                    reused: true,
                });
            }
        }
        self.checkout_fresh(connect_timeout).await
    }

    /// A new connection, never a pooled one.
    pub async fn checkout_fresh(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, ConnectError> {
        let stream = match tokio::time::timeout(
            connect_timeout,
            tokio::net::TcpStream::connect(&*self.authority),
        )
        .await
        {
            Err(_) => return Err(ConnectError::Timeout(self.authority.to_string())),
            Ok(Err(e)) => return Err(ConnectError::Io(self.authority.to_string(), e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(self.authority.to_string(), e))?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %authority, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(PooledConn {
            sender,
            upstream: self.clone(),
            reused: false,
        })
    }
}

/// The upstreams of one route, tried in round-robin order.
#[derive(Debug)]
pub struct UpstreamGroup {
    members: Vec<Arc<Upstream>>,
    next: AtomicUsize,
}

impl UpstreamGroup {
    pub fn new(members: Vec<Arc<Upstream>>) -> UpstreamGroup {
        UpstreamGroup {
            members,
            next: AtomicUsize::new(0),
        }
    }

    /// Every member once, starting at the next one in turn.
    pub fn order(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        let n = self.members.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        (0..n).map(move |i| &self.members[(start + i) % n])
    }

    pub fn members(&self) -> &[Arc<Upstream>] {
        &self.members
    }
}

/// Process-wide map from address to pool. Holds weak references: an upstream that no snapshot
/// uses any more is dropped with its idle connections.
#[derive(Default)]
pub struct UpstreamRegistry {
    map: Mutex<HashMap<String, Weak<Upstream>>>,
}

impl UpstreamRegistry {
    pub fn get(&self, authority: &str) -> Arc<Upstream> {
        let Ok(mut map) = self.map.lock() else {
            return Arc::new(Upstream::new(authority.into()));
        };
        if let Some(up) = map.get(authority).and_then(Weak::upgrade) {
            return up;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let up = Arc::new(Upstream::new(authority.into()));
        map.insert(authority.to_string(), Arc::downgrade(&up));
        up
    }
}
