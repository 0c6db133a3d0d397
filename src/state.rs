//! The published state: the immutable `Snapshot` every handshake and request reads, `Shared`, the
//! process-wide state around it (the `ArcSwap`, upstream pools, TLS tickets, readiness, metrics),
//! and the reload status the admin listener shows.
//!
//! Owns: `Shared::publish`, the one function that stores a new snapshot after start. Sits below
//! both the snapshot's writer (`reload`) and its readers (`proxy`, `admin`, `server`), and imports
//! nothing above `routing`. Must not touch: files, sockets, building a snapshot.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::routing::RouteTable;
use crate::tls::{CertStore, TlsShared};
use crate::upstream::UpstreamRegistry;

/// Everything one handshake or request needs, immutable once published.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every publish.
    pub generation: u64,
    pub config: Arc<Config>,
    pub routes: Arc<RouteTable>,
    pub certs: Arc<CertStore>,
    /// The rustls config serving `certs`; built once per snapshot, not per handshake.
    /// The default config and one per client-certificate policy.
    pub tls: Arc<crate::tls::ServerTls>,
}

// ---------------------------------------------------------------- reload status

/// The outcome of reloads of one kind (config or certs).
#[derive(Debug, Clone, Default)]
pub struct KindStatus {
    pub successes: u64,
    pub failures: u64,
    /// Time and result of the last attempt; `None` before the first reload after start.
    pub last_attempt: Option<SystemTime>,
    pub last_ok: bool,
    pub last_success: Option<SystemTime>,
    /// The current problems, one line each; empty when all is well.
    pub errors: Vec<String>,
}

/// What the reloader has done, for the admin listener and tests.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub config: KindStatus,
    pub certs: KindStatus,
    pub polls: u64,
}

impl KindStatus {
    pub fn record(
        &mut self,
        metrics: &crate::metrics::Metrics,
        kind: &'static str,
        ok: bool,
        errors: Vec<String>,
    ) {
        metrics.reload(kind, ok);
        let now = SystemTime::now();
        self.last_attempt = Some(now);
        self.last_ok = ok;
        if ok {
            self.successes += 1;
            self.last_success = Some(now);
        } else {
            self.failures += 1;
        }
        self.errors = errors;
    }
}

/// State shared by every task of one running proxy.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: UpstreamRegistry,
    pub tls: TlsShared,
    /// False until listeners are bound, and again from the moment shutdown starts.
    pub ready: AtomicBool,
    /// What the reloader has done, refreshed after every poll.
    pub reload_status: std::sync::Mutex<ReloadStatus>,
    pub metrics: crate::metrics::Metrics,
    pub started: std::time::SystemTime,
    /// `listen.admin_token_file`'s token, kept current by the reloader; None: no token needed.
    pub admin_token: arc_swap::ArcSwapOption<Vec<u8>>,
}

impl Shared {
    /// The state around a first snapshot (loaded successfully, so the config gauges say so); not
    /// ready until listeners are bound.
    pub fn new(snapshot: Snapshot, tls: TlsShared, registry: UpstreamRegistry) -> Shared {
        let metrics = crate::metrics::Metrics::new();
        observe(&metrics, &snapshot);
        metrics.config_reload_successful.set(1);
        metrics.config_last_success.set(crate::metrics::unix_now());
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            tls,
            ready: AtomicBool::new(false),
            reload_status: std::sync::Mutex::default(),
            metrics,
            started: std::time::SystemTime::now(),
            admin_token: arc_swap::ArcSwapOption::empty(),
        }
    }
}

impl Shared {
    /// Publishes a new snapshot: the one place a snapshot is stored after start. One store of a
    /// fully built value, so a handshake or request sees the old one or the new one, whole.
    pub fn publish(&self, snapshot: Snapshot) {
        observe(&self.metrics, &snapshot);
        self.snapshot.store(Arc::new(snapshot));
    }
}

/// The generation and certificate-expiry gauges follow every published snapshot.
fn observe(metrics: &crate::metrics::Metrics, snapshot: &Snapshot) {
    metrics.observe(
        snapshot.generation,
        snapshot
            .certs
            .certs()
            .iter()
            .map(|c| (c.names.as_slice(), c.cert_file.as_path(), c.not_after)),
    );
}
