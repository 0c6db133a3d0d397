//! The published state: the immutable `Snapshot` every handshake and request reads, `Shared`, the
//! process-wide state around it (the `ArcSwap`, upstream pools, TLS tickets, readiness, metrics),
//! and the reload status the admin listener shows.
//!
//! Owns: `Shared::publish`, the one function that stores a new snapshot after start. Sits below
//! both the snapshot's writer (`reload`) and its readers (`proxy`, `admin`, `server`), and imports
//! nothing above `routing`. Must not touch: files, sockets, building a snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
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

/// One config file as served: the main file or a `routes_dir` file.
#[derive(Debug, Clone)]
pub struct FileStatus {
    pub file: std::path::PathBuf,
    /// SHA-256 of the content served; None: nothing from this file is served yet.
    pub sha256: Option<String>,
    /// Its current problem.
    pub error: Option<String>,
    /// The file on disk is not what is served (it failed, or was rolled back).
    pub pending: bool,
    pub routes: usize,
}

/// One entry of the reload history.
#[derive(Debug, Clone)]
pub struct ReloadEvent {
    /// The generation served after the event.
    pub generation: u64,
    pub at: SystemTime,
    /// `config` or `cert`.
    pub kind: &'static str,
    pub file: String,
    /// `applied`, `failed` or `rolled_back`.
    pub result: &'static str,
    pub summary: String,
}

/// A probation rollback: what was put back, when, and why.
#[derive(Debug, Clone)]
pub struct RollBack {
    /// The generation that was rolled back to: the one serving the restored routes.
    pub generation: u64,
    pub at: SystemTime,
    pub reason: String,
}

/// How many reload events the history keeps.
pub const HISTORY: usize = 50;

/// What the reloader has done, for the admin listener and tests.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub config: KindStatus,
    pub certs: KindStatus,
    pub polls: u64,
    /// Every config file watched, the main file first.
    pub files: Vec<FileStatus>,
    /// The last `HISTORY` reload events, newest first.
    pub history: std::collections::VecDeque<ReloadEvent>,
    pub rolled_back: Option<RollBack>,
    /// A fingerprint of each secret in force, by config key (never the content).
    pub secrets: std::collections::BTreeMap<String, String>,
}

impl ReloadStatus {
    /// Adds an event to the history, dropping the oldest past `HISTORY`.
    pub fn event(
        &mut self,
        generation: u64,
        kind: &'static str,
        file: &std::path::Path,
        result: &'static str,
        summary: String,
    ) {
        self.history.push_front(ReloadEvent {
            generation,
            at: SystemTime::now(),
            kind,
            file: file.display().to_string(),
            result,
            summary,
        });
        self.history.truncate(HISTORY);
    }
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

/// The connection limit, resizable in place: lowering it never cuts a connection, it only
/// refuses new ones until the count is under the new limit.
#[derive(Debug)]
pub struct ConnLimit {
    open: std::sync::atomic::AtomicUsize,
    limit: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

/// One connection's place under the limit, given back when dropped.
#[derive(Debug)]
pub struct ConnPermit(Arc<ConnLimit>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

impl ConnLimit {
    pub fn new(limit: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            open: 0.into(),
            limit: limit.into(),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// A place for one more connection, if the count is under the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnPermit(self.clone()))
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Resolves once no connection is open.
    pub async fn drained(&self) {
        loop {
            let closed = self.closed.notified();
            if self.open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// The listeners' bound addresses, for the status page and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct BoundAddrs {
    pub https: Option<std::net::SocketAddr>,
    pub http: Option<std::net::SocketAddr>,
    pub admin: Option<std::net::SocketAddr>,
    /// UDP: HTTP/3.
    pub quic: Option<std::net::SocketAddr>,
}

/// A socket bound for the config of a generation about to be published.
pub type Handoff = (u64, ListenerKind, std::net::SocketAddr, BoundSocket);

/// A listening socket: TCP for HTTPS, HTTP and admin; UDP for QUIC.
#[derive(Debug)]
pub enum BoundSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Which listener a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Https,
    Http,
    Admin,
    Quic,
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
    /// The generation just published: the listeners' supervisor wakes on it.
    pub published: tokio::sync::watch::Sender<u64>,
    /// Sockets the reloader bound for a new config's listen addresses (bound before the
    /// config is published, so a bind failure refuses it), for the server to take over, each
    /// with the generation that will name it.
    pub handoff: std::sync::Mutex<Vec<Handoff>>,
    /// Where the listeners are bound now.
    pub listeners: std::sync::Mutex<BoundAddrs>,
    /// The HTTPS listener's port now, for redirects (read per connection, so no lock).
    pub https_port: std::sync::atomic::AtomicU16,
    /// The QUIC listener's port now, for `Alt-Svc`; 0: none.
    pub quic_port: std::sync::atomic::AtomicU16,
    /// TLS connections that ended or parked since start: each left freed buffers with the
    /// allocator, which the memory releaser (`server::Running::release_memory_with`) reads.
    pub released: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The state around a first snapshot (loaded successfully, so the config gauges say so); not
    /// ready until listeners are bound.
    pub fn new(snapshot: Snapshot, tls: TlsShared, registry: UpstreamRegistry) -> Shared {
        let metrics = crate::metrics::Metrics::new();
        observe(&metrics, None, &snapshot);
        let generation = snapshot.generation;
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
            published: tokio::sync::watch::Sender::new(generation),
            handoff: std::sync::Mutex::default(),
            listeners: std::sync::Mutex::default(),
            https_port: std::sync::atomic::AtomicU16::new(0),
            quic_port: std::sync::atomic::AtomicU16::new(0),
            released: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Shared {
    /// Publishes a new snapshot: the one place a snapshot is stored after start. One store of a
    /// fully built value, so a handshake or request sees the old one or the new one, whole.
    pub fn publish(&self, snapshot: Snapshot) {
        observe(&self.metrics, Some(&self.snapshot.load()), &snapshot);
        let generation = snapshot.generation;
        self.snapshot.store(Arc::new(snapshot));
        self.published.send_replace(generation);
    }
}

/// The generation and certificate gauges follow every published snapshot. Only the certificates
/// that came or went touch their series: with 10,000 certificates, rebuilding every series at each
/// publish cost more than the poll (38 ms of 130 in the scale bench).
fn observe(metrics: &crate::metrics::Metrics, old: Option<&Snapshot>, new: &Snapshot) {
    metrics.set_generation(new.generation);
    if old.is_some_and(|o| Arc::ptr_eq(&o.certs, &new.certs)) {
        return;
    }
    // A cert that stayed is the same allocation in both maps (the reloader keeps its Arc); the
    // old snapshot is alive here, so no address can have been reused.
    let key = |c: &Arc<crate::tls::LoadedCert>| Arc::as_ptr(c) as usize;
    let before: &[Arc<crate::tls::LoadedCert>] = old.map_or(&[], |o| o.certs.certs());
    let after = new.certs.certs();
    let kept: FastSet<usize> = after.iter().map(key).collect();
    let gone: Vec<&Arc<crate::tls::LoadedCert>> =
        before.iter().filter(|c| !kept.contains(&key(c))).collect();
    let had: FastSet<usize> = before.iter().map(key).collect();
    // Two files with the same content share their `certificate_info` series: one that stays
    // gets it back after the other went.
    let gone_sha: FastSet<&str> = gone.iter().map(|c| c.sha256.as_str()).collect();
    metrics.forget_certs(gone.iter().map(|c| facts(c)));
    metrics.add_certs(
        after
            .iter()
            .filter(|c| !had.contains(&key(c)) || gone_sha.contains(c.sha256.as_str()))
            .map(facts),
    );
}

fn facts(c: &Arc<crate::tls::LoadedCert>) -> (&[String], &std::path::Path, i64, &str) {
    (
        c.names.as_slice(),
        c.cert_file.as_path(),
        c.not_after,
        c.sha256.as_str(),
    )
}

/// A fast, non-cryptographic hasher for the reloader's maps and sets, keyed by our own file paths
/// or by addresses of our own allocations (never by input from the network): SipHash's DoS
/// resistance buys nothing there, and hashing 20,000 paths per poll shows.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

/// A set hashed with `FastHasher`.
pub type FastSet<T> = std::collections::HashSet<T, std::hash::BuildHasherDefault<FastHasher>>;

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        // FxHash's multiply-rotate over 8-byte words.
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        // The product's best-mixed bits are its high ones, and the table indexes by the low
        // ones: an address (its low bits always 0) would otherwise fill a sixteenth of it.
        self.0.rotate_left(26)
    }
}

/// A lock shared by the reload thread, the server and the admin listener, taken even after a
/// panic elsewhere poisoned it: the data behind these locks (hand-over sockets, bound addresses,
/// reload facts) is replaced whole under the lock, so it is never half-written, and skipping the
/// work instead would lose sockets or hide the reload status.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
