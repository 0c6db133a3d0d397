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

use crate::body::RequestBody;

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
    #[error("no descriptor left for a new connection to {0} within the connect timeout (the upstream connection budget is in use)")]
    Exhausted(String),
}

/// A place in the process-wide upstream connection budget, held by a connection for its life.
type Place = Option<tokio::sync::OwnedSemaphorePermit>;

struct Idle {
    sender: Sender,
    since: Instant,
    _place: Place,
}

/// One upstream address and its pool.
pub struct Upstream {
    /// `host:port`; shared, since logs and metrics label requests with it.
    pub authority: Arc<str>,
    /// Oldest first.
    idle: Mutex<VecDeque<Idle>>,
    registry: Arc<RegistryShared>,
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
    place: Place,
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
                    _place: self.place,
                });
            }
        }
    }
}

impl Upstream {
    fn new(authority: Arc<str>, registry: Arc<RegistryShared>) -> Upstream {
        Upstream {
            authority,
            idle: Mutex::new(VecDeque::new()),
            registry,
        }
    }

    /// The most recently used idle connection (the warmest, the least likely to have been closed
    /// by the upstream); expired ones are dropped from the cold end.
    fn take_idle(&self) -> Option<(Sender, Place)> {
        let mut idle = self.idle.lock().ok()?;
        while idle
            .front()
            .is_some_and(|c| c.since.elapsed() >= POOL_IDLE || c.sender.is_closed())
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

    /// A ready connection: an idle one if there is one, else a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<PooledConn, ConnectError> {
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
                    sender,
                    upstream: self.clone(),
                    reused: true,
                    place,
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
        let place = self
            .registry
            .place(connect_timeout)
            .await
            .ok_or_else(|| ConnectError::Exhausted(self.authority.to_string()))?;
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
            place,
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
    shared: Arc<RegistryShared>,
}

#[derive(Default)]
struct RegistryShared {
    map: Mutex<HashMap<String, Weak<Upstream>>>,
    /// The descriptors upstream connections may use, all pools together; unset: no limit.
    budget: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl RegistryShared {
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
    pub fn get(&self, authority: &str) -> Arc<Upstream> {
        let Ok(mut map) = self.shared.map.lock() else {
            return Arc::new(Upstream::new(authority.into(), self.shared.clone()));
        };
        if let Some(up) = map.get(authority).and_then(Weak::upgrade) {
            return up;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let up = Arc::new(Upstream::new(authority.into(), self.shared.clone()));
        map.insert(authority.to_string(), Arc::downgrade(&up));
        up
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
