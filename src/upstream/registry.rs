//! The process-wide registry of upstream pools, keyed by address and settings, with the shared
//! descriptor budget, the settings every pool reads (HTTP/2 keep-alive and limits, idle time),
//! the idle sweep and the health checkers' start.
//!
//! Must not touch: one exchange (`client`), dialling (`dial`).

use super::*;

/// Process-wide map from address to pool. Holds weak references: an upstream that no snapshot
/// uses any more is dropped with its idle connections.
#[derive(Default)]
pub struct UpstreamRegistry {
    pub(super) shared: Arc<RegistryShared>,
}

#[derive(Default)]
pub(super) struct RegistryShared {
    pub(super) map: Mutex<HashMap<String, Weak<Upstream>>>,
    /// The descriptors upstream connections may use, all pools together; unset: no limit.
    pub(super) budget: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
    /// PING interval and timeout of new HTTP/2 upstream connections; unset: the defaults.
    pub(super) h2_keepalive: Mutex<Option<(Duration, Duration)>>,
    /// Set once serving starts: health checkers run from then on (never under `--check`).
    pub(super) runner: std::sync::OnceLock<health::Runner>,
    /// `timeouts.upstream_idle` in milliseconds; 0: unset (30 s).
    pub(super) pool_idle_ms: std::sync::atomic::AtomicU64,
    /// `limits.upstream_h2_streams` and `upstream_h2_connections`; 0: unset (the defaults).
    pub(super) h2_streams: AtomicUsize,
    pub(super) h2_connections: AtomicUsize,
    /// `limits.max_header_bytes`; 0: unset (64 KiB).
    pub(super) header_bytes: AtomicUsize,
}

/// Every sixth of `timeouts.upstream_idle`, expires the idle connections of every live upstream,
/// so a pool that filled during a burst gives its connections (and their memory) back within
/// that time plus a sixth once traffic stops, as checkouts do while traffic goes on.
pub(super) async fn sweep_idle(
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
    pub(super) fn h2_limits(&self) -> (usize, usize) {
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

    /// `limits.max_header_bytes`, or its default until a config sets it.
    pub(super) fn header_limit(&self) -> usize {
        match self.header_bytes.load(Ordering::Relaxed) {
            0 => 65536,
            n => n,
        }
    }

    pub(super) fn pool_idle(&self) -> Duration {
        match self.pool_idle_ms.load(Ordering::Relaxed) {
            0 => Duration::from_secs(30),
            ms => Duration::from_millis(ms),
        }
    }

    pub(super) fn h2_keepalive(&self) -> (Duration, Duration) {
        self.h2_keepalive
            .lock()
            .ok()
            .and_then(|k| *k)
            .unwrap_or(H2_PING_DEFAULT)
    }

    /// A place for one more upstream connection: at once if the budget has room, else after
    /// closing the coldest idle connection of any pool, else the first freed within `wait`.
    /// Some(None): no budget is set. None: none came free in time.
    pub(super) async fn place(&self, wait: Duration) -> Option<Place> {
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
    pub(super) fn evict_coldest_idle(&self) -> bool {
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

    /// The largest response head an upstream may send, every protocol alike
    /// (`limits.max_header_bytes`), for connections opened from now on.
    pub fn set_header_limit(&self, bytes: usize) {
        self.shared.header_bytes.store(bytes, Ordering::Relaxed);
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

/// HTTP/2 upstream keep-alive until a config sets it (`timeouts.upstream_ping_interval` and
/// `upstream_ping_timeout` have the same defaults).
pub(super) const H2_PING_DEFAULT: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(20));
