//! Snapshots and passive hot reload: building the immutable state that handshakes and requests
//! read, and rebuilding it when files change on disk.
//!
//! Owns: the initial load (strict: any problem is fatal), the metadata poller (one thread, the only
//! writer of the published snapshot after start), per-file fingerprints, the content-hash safety net,
//! the last good version of every certificate, file permission checks, and the reload facts the
//! admin listener shows. A change to the config rebuilds the config half (route table); a change to
//! a certificate re-reads that one pair and rebuilds the certificate map around it. Must not touch:
//! sockets or live connections; a published snapshot is never modified, only replaced.

mod client_ca;
mod routes;
mod secrets;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, ConfigError, UpstreamScheme, UpstreamTls};
use crate::routing::RouteTable;
use crate::state::{FastSet, ReloadStatus, Shared, Snapshot};
use crate::tls::{CertSource, CertStore, LoadedCert, TlsError, TlsShared};
use crate::upstream::UpstreamRegistry;

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{}", join_lines(.0))]
    Certs(Vec<TlsError>),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(rustls::Error),
}

fn join_lines(errs: &[TlsError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl LoadError {
    /// One message per problem, for `--check` and start-up.
    pub fn messages(&self) -> Vec<String> {
        match self {
            LoadError::Certs(v) => v.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

// ---------------------------------------------------------------- fingerprints

/// What a file's metadata says about its contents. Any difference counts as a change: mtime can
/// move backwards (`cp -p`, `tar x`, `rsync -t`), two writes can share a second, and a symlink swap
/// changes the inode while everything else may look the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub size: u64,
    pub ino: u64,
    pub dev: u64,
}

/// How the poller reads metadata; tests inject one that hides changes.
pub type StatFn = fn(&Path) -> Option<Fingerprint>;

/// The fingerprint of the file `path` resolves to now (symlinks followed at every call).
pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        size: m.size(),
        ino: m.ino(),
        dev: m.dev(),
    })
}

fn hash_bytes(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// SHA-256 of a config or routes file's content, lower-case hex: what replicas compare.
fn sha256_file(path: &Path) -> Option<String> {
    let bytes = crate::config::read_regular(path, crate::config::MAX_CONFIG_BYTES).ok()?;
    Some(crate::tls::hex(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
    ))
}

fn hash_files(paths: &[&Path]) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        crate::config::read_regular(p, crate::config::MAX_CONFIG_BYTES)
            .ok()?
            .hash(&mut h);
    }
    Some(h.finish())
}

pub(super) use crate::state::FastHasher as PathHasher;

pub(super) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<PathHasher>>;

// ---------------------------------------------------------------- permissions

fn own_uid() -> u32 {
    static UID: OnceLock<u32> = OnceLock::new();
    *UID.get_or_init(|| {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0)
    })
}

/// The draft's security rule: a file anyone could write, or that another (non-root) user owns,
/// could be used to hijack the proxy, so it is refused.
fn permission_problem(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    if m.mode() & 0o002 != 0 {
        return Some(format!(
            "{}: refused: the file is world-writable, so any local user could change what limen serves; run `chmod o-w {}`",
            path.display(),
            path.display()
        ));
    }
    let uid = own_uid();
    if m.uid() != uid && m.uid() != 0 {
        return Some(format!(
            "{}: refused: the file is owned by uid {}, neither limen's user (uid {uid}) nor root; chown it to one of them",
            path.display(),
            m.uid()
        ));
    }
    None
}

fn world_readable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o004 != 0)
}

// ---------------------------------------------------------------- the reloader

/// A config change on probation: the routes it added or changed (armed to count their answers),
/// the files it changed, and what to put back.
struct OnProbation {
    started: Instant,
    settings: crate::config::Probation,
    routes: Vec<Arc<crate::routing::Route>>,
    /// The main file's config before the change and its content's hash, when the change was
    /// the main file's.
    main_before: Option<(Arc<Config>, Option<String>)>,
    /// The routes_dir files the change applied.
    files: Vec<PathBuf>,
    /// The generation served before the change.
    generation_before: u64,
    /// Answers and failures counted by routes since replaced by a rebuild of the same config.
    carried: (u64, u64),
}

impl Drop for OnProbation {
    fn drop(&mut self) {
        for r in &self.routes {
            r.watch.arm(false);
        }
    }
}

/// One certificate pair the poller watches.
struct WatchedCert {
    cert_fp: Option<Fingerprint>,
    key_fp: Option<Fingerprint>,
    hash: Option<u64>,
    /// The last version that loaded cleanly; served until a better one loads.
    good: Option<Arc<LoadedCert>>,
    /// The current problem, logged once when it first appears.
    error: Option<String>,
    /// Consecutive polls in which neither file of the pair existed.
    gone_polls: u32,
    warned_readable: bool,
    /// The last poll that listed this pair: one not listed by the current one is retired.
    seen: u64,
}

impl WatchedCert {
    /// Reads the pair again and records the outcome: the new version, or the error (logged once
    /// per distinct message) with the last good version kept. Returns the error, and whether the
    /// set of good certificates changed. `announce`: log additions (not at the initial load).
    fn reload(
        &mut self,
        src: &CertSource,
        tls: &TlsShared,
        fps: (Option<Fingerprint>, Option<Fingerprint>),
        announce: bool,
    ) -> (Option<TlsError>, bool) {
        let result = [&src.cert, &src.key]
            .into_iter()
            .find_map(|p| permission_problem(p))
            .map_or_else(
                || {
                    read_pair_stable(src).and_then(|(c, k)| {
                        let loaded = crate::tls::parse_pair(&c, &k, src, tls.provider())?;
                        Ok((loaded, hash_bytes(&[&c, &k])))
                    })
                },
                |p| {
                    Err(TlsError::Read {
                        path: src.cert.clone(),
                        reason: p,
                    })
                },
            );
        match result {
            Ok((loaded, hash)) => {
                if self.good.is_some() {
                    tracing::info!(file = %src.cert.display(), names = ?loaded.names, "certificate replaced");
                } else if announce {
                    tracing::info!(file = %src.cert.display(), names = ?loaded.names, "certificate added");
                }
                if !self.warned_readable && world_readable(&src.key) {
                    self.warned_readable = true;
                    tracing::warn!(file = %src.key.display(), "private key is world-readable; chmod 0400 it (Kubernetes: defaultMode: 0440 on the secret volume with an fsGroup, or 0400 when limen runs as the files' owner)");
                }
                self.good = Some(Arc::new(loaded));
                self.cert_fp = fps.0;
                self.key_fp = fps.1;
                self.hash = Some(hash);
                if self.error.take().is_some() {
                    tracing::info!(file = %src.cert.display(), "certificate loads again");
                }
                (None, true)
            }
            Err(e) => {
                let msg = e.to_string();
                if self.error.as_deref() != Some(msg.as_str()) {
                    match &self.good {
                        Some(g) => {
                            tracing::error!(names = ?g.names, "{msg}; still serving the last good version")
                        }
                        None => tracing::error!("{msg}"),
                    }
                    self.error = Some(msg);
                }
                (Some(e), false)
            }
        }
    }
}

/// One `upstream_tls` block under watch.
#[derive(Default)]
struct WatchedUpstreamTls {
    fps: Vec<Option<Fingerprint>>,
    hash: Option<u64>,
    config: Option<Arc<rustls::ClientConfig>>,
    error: Option<String>,
}

/// The files an `upstream_tls` block names.
fn upstream_tls_paths(settings: &UpstreamTls) -> Vec<&Path> {
    let mut v: Vec<&Path> = settings.ca.iter().map(PathBuf::as_path).collect();
    if let Some((c, k)) = &settings.client {
        v.push(c);
        v.push(k);
    }
    v
}

/// Reads an `upstream_tls` block's files until two reads in a row agree, as for a cert pair.
fn read_upstream_tls_stable(
    settings: &UpstreamTls,
) -> Result<crate::tls::UpstreamTlsFiles, TlsError> {
    if let Some(p) = upstream_tls_paths(settings)
        .into_iter()
        .find_map(|p| permission_problem(p).map(|why| (p, why)))
    {
        return Err(TlsError::Read {
            path: p.0.to_path_buf(),
            reason: p.1,
        });
    }
    read_stable(&settings.ca.clone().unwrap_or_default(), || {
        crate::tls::read_upstream_tls(settings)
    })
}

/// `read` repeated until two reads in a row agree, so a file caught mid-write is never parsed as
/// whole. Bounded, like Envoy's retry on watched secrets; `path` names the files in the error.
fn read_stable<T: PartialEq>(
    path: &Path,
    read: impl Fn() -> Result<T, TlsError>,
) -> Result<T, TlsError> {
    let mut prev = read()?;
    for _ in 0..5 {
        let next = read()?;
        if next == prev {
            return Ok(next);
        }
        prev = next;
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(TlsError::Read {
        path: path.to_path_buf(),
        reason: "the files kept changing while being read; will retry at the next poll".into(),
    })
}

/// Reads a pair until two reads in a row agree, so a file caught mid-write is never parsed as
/// whole. Bounded, like Envoy's retry on watched secrets.
fn read_pair_stable(src: &CertSource) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    use crate::tls::read;
    read_stable(&src.cert, || Ok((read(&src.cert)?, read(&src.key)?)))
}

/// Loads the config file and every certificate, keeps what it learnt about each file, and turns
/// later changes on disk into new snapshots.
pub struct Reloader {
    path: PathBuf,
    stat: StatFn,
    /// The main file's config as loaded: its own routes only.
    main: Option<Arc<Config>>,
    /// SHA-256 of the main file's content served.
    main_sha: Option<String>,
    /// The `routes_dir` files.
    route_files: routes::RouteFiles,
    /// A routes file changed since the last publish.
    routes_pending: bool,
    /// The config change being watched by `reload.probation`.
    probation: Option<OnProbation>,
    /// The publish under way puts back routes: it starts no probation of its own.
    rolling_back: bool,
    /// A file's state changed since `status.files` was last built.
    files_dirty: bool,
    /// A publish failed for some files' sake and the others were put back: try again now,
    /// without a verify pass (which would read the culprits again).
    retry_without: bool,
    /// The main file's content refused by a rollback: not applied again until it changes.
    main_refused: Option<String>,
    /// The config served: the main file's with every file's routes.
    config: Option<Arc<Config>>,
    routes: Option<Arc<RouteTable>>,
    config_fp: Option<Fingerprint>,
    config_hash: Option<u64>,
    /// The fingerprint and message of the config that failed last, so it is reported once.
    config_failure: Option<(Option<Fingerprint>, String)>,
    /// Hashed, not ordered: `Path`'s ordering walks components and costs a poll over 10,000
    /// pairs several milliseconds.
    certs: FastMap<CertSource, WatchedCert>,
    /// How many cert polls have run: each marks the pairs it listed (`WatchedCert::seen`).
    cert_polls: u64,
    dir_errors: BTreeMap<PathBuf, String>,
    /// The files of every `upstream_tls` block in force, with the last good client config built
    /// from them.
    upstream_tls: HashMap<UpstreamTls, WatchedUpstreamTls>,
    /// The development certificate and the hosts it was made for; regenerated only when those change.
    self_signed: Option<(Vec<String>, Arc<LoadedCert>)>,
    store: Option<Arc<CertStore>>,
    last_verify: Instant,
    /// The certificate set changed since the last publish.
    certs_pending: bool,
    /// An upstream TLS block changed since the last publish.
    upstream_tls_pending: bool,
    generation: u64,
    pub status: ReloadStatus,
    /// `listen.admin_token_file`, when set.
    admin_token: secrets::WatchedSecret,
    /// `tls.ticket_keys`, when set.
    ticket_keys: secrets::WatchedSecret,
    /// The CA bundles of `tls.client_auth`.
    client_cas: client_ca::ClientCas,
}

impl Reloader {
    pub fn new(path: &Path) -> Reloader {
        Reloader::with_stat(path, fingerprint)
    }

    pub fn with_stat(path: &Path, stat: StatFn) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            stat,
            main: None,
            main_sha: None,
            route_files: routes::RouteFiles::default(),
            routes_pending: false,
            probation: None,
            rolling_back: false,
            files_dirty: false,
            retry_without: false,
            main_refused: None,
            config: None,
            routes: None,
            config_fp: None,
            config_hash: None,
            config_failure: None,
            certs: FastMap::default(),
            cert_polls: 0,
            dir_errors: BTreeMap::new(),
            upstream_tls: HashMap::new(),
            self_signed: None,
            store: None,
            last_verify: Instant::now(),
            certs_pending: false,
            upstream_tls_pending: false,
            generation: 0,
            status: ReloadStatus::default(),
            admin_token: secrets::WatchedSecret::default(),
            ticket_keys: secrets::WatchedSecret::default(),
            client_cas: client_ca::ClientCas::default(),
        }
    }

    /// Seeds what the admin listener shows before the first poll: each file's series and the
    /// reload status of the initial load.
    pub fn announce(&self, shared: &Shared) {
        for f in &self.status.files {
            shared
                .metrics
                .config_file(&f.file.display().to_string(), true, false);
        }
        shared.metrics.config_files(
            self.status
                .files
                .iter()
                .filter_map(|f| Some((f.file.to_str()?, f.sha256.as_deref()?))),
        );
        if let Ok(mut s) = shared.reload_status.lock() {
            s.clone_from(&self.status);
        }
    }

    /// The admin token loaded, if `listen.admin_token_file` is set.
    pub fn admin_token(&self) -> Option<Arc<Vec<u8>>> {
        self.admin_token.value.clone()
    }

    /// Re-reads `tls.ticket_keys` when it changed and hands the keys to the ticketer (tickets
    /// issued from then on use the first; every listed key still reads). A broken file keeps the
    /// last good keys. Err: a new problem, already logged.
    fn refresh_ticket_keys(
        &mut self,
        config: &Config,
        tls: &TlsShared,
        metrics: Option<&crate::metrics::Metrics>,
        verify: bool,
    ) -> Result<(), String> {
        let Some(path) = &config.tls.ticket_keys else {
            tls.ticketer().set(None);
            self.ticket_keys = secrets::WatchedSecret::default();
            return Ok(());
        };
        let check = |b: &[u8]| crate::tickets::TicketKeys::parse(b).map(|_| ());
        match self.ticket_keys.refresh(
            path,
            self.stat,
            verify,
            secrets::OthersMayRead::Warn,
            &check,
        ) {
            secrets::Refresh::Unchanged => Ok(()),
            secrets::Refresh::Loaded => {
                let keys = self
                    .ticket_keys
                    .value
                    .as_deref()
                    .map(|v| crate::tickets::TicketKeys::parse(v))
                    .transpose()?;
                let n = keys.as_ref().map_or(0, |k| k.len());
                tls.ticketer().set(keys.map(Arc::new));
                if let Some(m) = metrics {
                    m.reload("ticket_keys", true);
                }
                tracing::info!(file = %path.display(), keys = n, "session-ticket keys loaded");
                Ok(())
            }
            secrets::Refresh::Failed(msg) => {
                if let Some(m) = metrics {
                    m.reload("ticket_keys", false);
                    tracing::error!("{msg}; tickets keep the last good keys");
                }
                Err(msg)
            }
        }
    }

    /// Re-reads the admin token file when it changed; a new token applies to the next admin
    /// request, a broken file keeps the last good token.
    fn refresh_admin_token(&mut self, config: &Config, shared: &Shared, verify: bool) {
        let Some(path) = &config.listen.admin_token_file else {
            return;
        };
        match self.admin_token.refresh(
            path,
            self.stat,
            verify,
            secrets::OthersMayRead::Refuse,
            &|_| Ok(()),
        ) {
            secrets::Refresh::Unchanged => {}
            secrets::Refresh::Loaded => {
                shared.admin_token.store(self.admin_token.value.clone());
                shared.metrics.reload("admin_token", true);
                tracing::info!(file = %path.display(), "admin token reloaded");
            }
            secrets::Refresh::Failed(msg) => {
                shared.metrics.reload("admin_token", false);
                tracing::error!("{msg}; the admin API keeps the last good token");
            }
        }
    }

    /// The first load: every problem is fatal, so limen starts with all it was told to serve or
    /// not at all.
    pub fn initial_load(
        &mut self,
        tls: &TlsShared,
        registry: &UpstreamRegistry,
    ) -> Result<Snapshot, LoadError> {
        let fp = (self.stat)(&self.path);
        let hash = hash_files(&[&self.path]);
        if let Some(p) = permission_problem(&self.path) {
            return Err(LoadError::Config(ConfigError::Refused(p)));
        }
        let main = Arc::new(Config::load(&self.path)?);
        self.route_files.load_all(&main, self.stat)?;
        let config = self.route_files.served(&main);
        if let Some(path) = &config.listen.admin_token_file {
            if let secrets::Refresh::Failed(msg) = self.admin_token.refresh(
                path,
                self.stat,
                false,
                secrets::OthersMayRead::Refuse,
                &|_| Ok(()),
            ) {
                return Err(LoadError::Config(ConfigError::Refused(msg)));
            }
        }
        self.refresh_ticket_keys(&config, tls, None, false)
            .map_err(|m| LoadError::Config(ConfigError::Refused(m)))?;
        let (mut errors, _) = self.refresh_certs(&config, tls, false);
        errors.extend(self.refresh_upstream_tls(&[&config], tls, false).0);
        errors.extend(
            self.client_cas
                .refresh(&[&config], self.stat, None, false)
                .0,
        );
        if !errors.is_empty() {
            return Err(LoadError::Certs(errors));
        }
        let store = self.assemble(&config, tls)?;
        registry.set_h2_keepalive(
            config.timeouts.upstream_ping_interval,
            config.timeouts.upstream_ping_timeout,
        );
        registry.set_pool_idle(config.timeouts.upstream_idle);
        let routes = Arc::new(RouteTable::build(
            &config.routes,
            config.timeouts.upstream_response,
            registry,
            &self.tls_configs(),
        ));
        self.config_fp = fp;
        self.config_hash = hash;
        self.main_sha = sha256_file(&self.path);
        self.main = Some(main);
        self.config = Some(config.clone());
        self.routes = Some(routes.clone());
        self.generation = 1;
        self.status.files = self.file_statuses();
        self.status
            .event(1, "config", &self.path, "applied", "started".into());
        let tls_cfg = tls
            .server_tls(store.clone(), &config.tls, &self.client_cas.roots())
            .map_err(LoadError::Tls)?;
        self.store = Some(store.clone());
        let now = SystemTime::now();
        for k in [&mut self.status.config, &mut self.status.certs] {
            k.last_ok = true;
            k.last_success = Some(now);
        }
        Ok(Snapshot {
            generation: 1,
            config,
            routes,
            certs: store,
            tls: tls_cfg,
        })
    }

    /// Why `config` cannot be served for want of upstream TLS settings (a block of an https
    /// route whose files did not load), if it cannot.
    fn missing_upstream_tls(&self, config: &Config) -> Option<String> {
        config.routes.iter().find_map(|r| {
            let https = matches!(&r.action, crate::config::RouteAction::Proxy(urls)
                if urls.iter().any(|u| u.url.scheme == UpstreamScheme::Https));
            let loaded = self
                .upstream_tls
                .get(&r.upstream_tls)
                .is_some_and(|w| w.config.is_some());
            (https && !loaded).then(|| {
                format!(
                    "route {} ({} {}): its upstream_tls settings did not load",
                    r.index, r.host, r.path
                )
            })
        })
    }

    /// The routes_dir files (by name) of the routes the last built config cannot serve for want
    /// of their upstream TLS settings.
    fn unservable_files(&self, config: &Config) -> Vec<std::ffi::OsString> {
        config
            .routes
            .iter()
            .filter(|r| {
                matches!(&r.action, crate::config::RouteAction::Proxy(urls)
                    if urls.iter().any(|u| u.url.scheme == UpstreamScheme::Https))
                    && self
                        .upstream_tls
                        .get(&r.upstream_tls)
                        .is_none_or(|w| w.config.is_none())
            })
            .filter_map(|r| r.unit.as_deref().map(std::ffi::OsString::from))
            .collect()
    }

    /// The client configs of the `upstream_tls` blocks in force.
    fn tls_configs(&self) -> crate::upstream::TlsConfigs {
        self.upstream_tls
            .iter()
            .filter_map(|(k, w)| Some((k.clone(), w.config.clone()?)))
            .collect()
    }

    /// Re-reads the files of every `upstream_tls` block whose files changed (or whose contents
    /// changed, when `verify` asks for hashes), and builds its client config again. A block that
    /// fails keeps its last good config; each problem is logged once. The second value says
    /// whether a config changed.
    /// `configs`: the config in force and the candidate, so a candidate that fails later does not
    /// cost the blocks in force their warm state.
    fn refresh_upstream_tls(
        &mut self,
        configs: &[&Config],
        tls: &TlsShared,
        verify: bool,
    ) -> (Vec<TlsError>, bool) {
        let wanted: HashSet<&UpstreamTls> = configs
            .iter()
            .flat_map(|c| c.routes.iter())
            .filter(|r| match &r.action {
                crate::config::RouteAction::Proxy(urls) => {
                    urls.iter().any(|u| u.url.scheme == UpstreamScheme::Https)
                }
                crate::config::RouteAction::Respond { .. } => false,
            })
            .map(|r| &r.upstream_tls)
            .collect();
        self.upstream_tls.retain(|k, _| wanted.contains(k));
        let (mut errors, mut changed) = (Vec::new(), false);
        for settings in wanted {
            let files = upstream_tls_paths(settings);
            let fps: Vec<Option<Fingerprint>> = files.iter().map(|p| (self.stat)(p)).collect();
            let entry = self.upstream_tls.entry(settings.clone()).or_default();
            let stale = entry.config.is_none()
                || entry.error.is_some()
                || entry.fps != fps
                || (verify && hash_files(&files) != entry.hash);
            if !stale {
                continue;
            }
            match read_upstream_tls_stable(settings)
                .and_then(|f| crate::tls::upstream_client_config(settings, &f, tls.provider()))
            {
                Ok(cfg) => {
                    if entry.config.is_some() {
                        tracing::info!(files = ?files, "upstream TLS settings reloaded");
                    }
                    if entry.error.take().is_some() {
                        tracing::info!(files = ?files, "upstream TLS settings load again");
                    }
                    entry.config = Some(cfg);
                    entry.fps = fps;
                    entry.hash = hash_files(&files);
                    changed = true;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if entry.error.as_deref() != Some(msg.as_str()) {
                        if entry.config.is_some() {
                            tracing::error!(
                                "{msg}; upstream connections keep the last good TLS settings"
                            );
                        } else {
                            tracing::error!("{msg}");
                        }
                        entry.error = Some(msg);
                    }
                    errors.push(e);
                }
            }
        }
        (errors, changed)
    }

    /// Re-lists the cert dirs and re-reads every pair whose files changed (or whose contents
    /// changed, when `verify` asks for hashes). Returns the problems met; each is logged once,
    /// when it first appears.
    /// The second value says whether the set of good certificates changed.
    fn refresh_certs(
        &mut self,
        config: &Config,
        tls: &TlsShared,
        verify: bool,
    ) -> (Vec<TlsError>, bool) {
        let mut dirty = false;
        let (sources, dir_errors) = crate::tls::discover(&config.tls);
        let mut errors: Vec<TlsError> = Vec::new();
        let mut new_dir_errors = BTreeMap::new();
        for e in dir_errors {
            if let TlsError::Dir { path, reason } = &e {
                if self.dir_errors.get(path) != Some(reason) {
                    tracing::error!("{e}");
                }
                new_dir_errors.insert(path.clone(), reason.clone());
            }
            errors.push(e);
        }
        self.dir_errors = new_dir_errors;

        // Each listed pair is marked with this poll's number rather than collected in a set:
        // at 10,000 pairs, hashing every path twice more per poll cost 5 ms.
        self.cert_polls += 1;
        let this_poll = self.cert_polls;
        for src in &sources {
            let cert_fp = (self.stat)(&src.cert);
            let key_fp = (self.stat)(&src.key);
            if !self.certs.contains_key(src) {
                self.certs.insert(
                    src.clone(),
                    WatchedCert {
                        cert_fp: None,
                        key_fp: None,
                        hash: None,
                        good: None,
                        error: None,
                        gone_polls: 0,
                        warned_readable: false,
                        seen: this_poll,
                    },
                );
            }
            let Some(entry) = self.certs.get_mut(src) else {
                continue;
            };
            entry.seen = this_poll;
            entry.gone_polls = 0;
            let changed = entry.good.is_none()
                || entry.error.is_some()
                || entry.cert_fp != cert_fp
                || entry.key_fp != key_fp
                || (verify && hash_files(&[&src.cert, &src.key]) != entry.hash);
            if !changed {
                continue;
            }
            let (err, changed) = entry.reload(src, tls, (cert_fp, key_fp), self.generation > 0);
            dirty |= changed;
            errors.extend(err);
        }

        dirty |= self.retire_unlisted(this_poll, config);
        (errors, dirty)
    }

    /// Pairs no longer listed: one file missing keeps the last good version (a deletion may be
    /// the first half of a replacement); both gone for two polls means removed on purpose; a
    /// vanished directory keeps its pairs; a pair the config stopped naming goes at once.
    /// True when a good certificate went.
    fn retire_unlisted(&mut self, this_poll: u64, config: &Config) -> bool {
        let mut dirty = false;
        let listed_dirs: Vec<&Path> = config.tls.cert_dirs.iter().map(PathBuf::as_path).collect();
        let mut removed = Vec::new();
        for (src, entry) in self.certs.iter_mut() {
            if entry.seen == this_poll {
                continue;
            }
            let in_config =
                listed_dirs.iter().any(|d| src.cert.starts_with(d)) && entry.good.is_some();
            let (c, k) = (src.cert.exists(), src.key.exists());
            // A directory that vanished whole (a remount, a non-atomic swap of the volume) says
            // nothing about its pairs: they stay until it is back and lists them no more.
            let dir_gone = listed_dirs
                .iter()
                .filter(|d| src.cert.starts_with(d))
                .any(|d| !d.is_dir());
            if !in_config {
                removed.push(src.clone());
            } else if dir_gone {
                entry.gone_polls = 0;
                let msg = format!(
                    "{}: its certificate directory is gone; still serving the last good certificate until the directory is back",
                    src.cert.display()
                );
                if entry.error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg}");
                    entry.error = Some(msg);
                }
            } else if !c && !k {
                entry.gone_polls += 1;
                if entry.gone_polls >= 2 {
                    removed.push(src.clone());
                } else if entry.error.is_none() {
                    entry.error = Some("removed".into());
                    tracing::warn!(file = %src.cert.display(), "certificate pair deleted; still serving it until it has been gone for two polls");
                }
            } else {
                entry.gone_polls = 0;
                let names = entry
                    .good
                    .as_ref()
                    .map(|g| g.names.clone())
                    .unwrap_or_default();
                let msg = if c && k {
                    format!("{}: no longer listed in its directory; still serving the last good certificate for {names:?}", src.cert.display())
                } else {
                    format!(
                        "{}: deleted; still serving the last good certificate for {names:?} until the pair is complete again",
                        if c { src.key.display() } else { src.cert.display() },
                    )
                };
                if entry.error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg}");
                    entry.error = Some(msg);
                }
            }
        }
        for src in removed {
            if let Some(e) = self.certs.remove(&src) {
                if let Some(g) = e.good {
                    dirty = true;
                    tracing::info!(file = %src.cert.display(), names = ?g.names, "certificate removed");
                }
            }
        }
        dirty
    }

    /// The certificate map from every last-good pair, plus the development cert when asked.
    fn assemble(&mut self, config: &Config, tls: &TlsShared) -> Result<Arc<CertStore>, LoadError> {
        let mut default = config.tls.default_cert.clone();
        if config.tls.self_signed {
            let mut certs: Vec<Arc<LoadedCert>> =
                self.certs.values().filter_map(|w| w.good.clone()).collect();
            // A stable order, so that ties between certificates resolve the same way every time.
            certs.sort_by(|a, b| a.cert_file.as_os_str().cmp(b.cert_file.as_os_str()));
            let store = CertStore::new(certs.clone());
            let mut hosts = crate::tls::uncovered_route_hosts(&store, &config.routes);
            if hosts.is_empty() && certs.is_empty() {
                hosts.push("localhost".into());
            }
            if hosts.is_empty() {
                self.self_signed = None;
            } else {
                let cert = match &self.self_signed {
                    Some((h, c)) if *h == hosts => c.clone(),
                    _ => {
                        let c = Arc::new(
                            crate::tls::self_signed(&hosts, tls.provider())
                                .map_err(|e| LoadError::Certs(vec![e]))?,
                        );
                        tracing::warn!(names = ?c.names, "serving a generated self-signed certificate: for development only, clients will not trust it");
                        self.self_signed = Some((hosts, c.clone()));
                        c
                    }
                };
                if default.is_none() {
                    default = cert.names.first().cloned();
                }
                certs.push(cert);
            }
            let mut store = CertStore::new(certs);
            store.log_choices();
            warn_expired(store.certs().iter());
            if let Some(name) = default {
                store
                    .set_default(&name)
                    .map_err(|e| LoadError::Certs(vec![e]))?;
            }
            return Ok(Arc::new(store));
        }
        self.assemble_from_files(config, default)
    }

    /// The map of the certificate files' last-good pairs: built from the map in force with only
    /// what changed since (certificates are compared by identity, as the reloader keeps each
    /// loaded one's `Arc` until its files change), or whole at the first load.
    fn assemble_from_files(
        &mut self,
        config: &Config,
        default: Option<String>,
    ) -> Result<Arc<CertStore>, LoadError> {
        let key = |c: &Arc<LoadedCert>| Arc::as_ptr(c) as usize;
        let mut store = match &self.store {
            Some(prev) => {
                let good: FastSet<usize> = self
                    .certs
                    .values()
                    .filter_map(|w| w.good.as_ref().map(key))
                    .collect();
                let had: FastSet<usize> = prev.certs().iter().map(key).collect();
                let gone: FastSet<usize> = had.difference(&good).copied().collect();
                let came: Vec<Arc<LoadedCert>> = self
                    .certs
                    .values()
                    .filter_map(|w| w.good.clone())
                    .filter(|c| !had.contains(&key(c)))
                    .collect();
                let store = prev.updated(&gone, came.clone());
                store.log_choices_of(came.iter());
                warn_expired(came.iter());
                store
            }
            None => {
                let mut certs: Vec<Arc<LoadedCert>> =
                    self.certs.values().filter_map(|w| w.good.clone()).collect();
                // A stable order, so that ties between certificates resolve the same way.
                certs.sort_by(|a, b| a.cert_file.as_os_str().cmp(b.cert_file.as_os_str()));
                let store = CertStore::new(certs);
                store.log_choices();
                warn_expired(store.certs().iter());
                store
            }
        };
        for host in crate::tls::uncovered_route_hosts(&store, &config.routes) {
            // "localhost" stands for a `*` route, which needs no particular certificate.
            if host != "localhost" {
                tracing::warn!("{}", TlsError::Uncovered { host });
            }
        }
        if let Some(name) = default {
            store
                .set_default(&name)
                .map_err(|e| LoadError::Certs(vec![e]))?;
        }
        Ok(Arc::new(store))
    }

    /// A config that cannot be applied: logged and counted once per distinct failure, however often
    /// the same file is read again; remembered with its fingerprint so an unchanged file is skipped.
    fn config_failed(
        &mut self,
        metrics: &crate::metrics::Metrics,
        fp: Option<Fingerprint>,
        msg: String,
    ) {
        if self.config_failure.as_ref().map(|(_, m)| m) != Some(&msg) {
            tracing::error!("config reload failed, the previous routes stay in force: {msg}");
            self.status
                .config
                .record(metrics, "config", false, vec![msg.clone()]);
            metrics.config_file(&self.path.display().to_string(), false, true);
            let path = self.path.clone();
            self.status
                .event(self.generation, "config", &path, "failed", msg.clone());
        }
        self.config_failure = Some((fp, msg));
    }

    /// One poll: looks at every watched file and publishes a new snapshot if anything changed and
    /// the new state is valid. Returns the new generation when one was published.
    pub fn poll(&mut self, shared: &Shared) -> Option<u64> {
        self.poll_with(shared, false)
    }

    /// Reads the config file that changed on disk. Some: a new config to apply; None: it was only
    /// touched (or put back as it was), or it failed (reported once, the old one stays).
    fn load_changed_config(
        &mut self,
        shared: &Shared,
        fp: Option<Fingerprint>,
        old_config: &Arc<Config>,
    ) -> Option<Arc<Config>> {
        // `old_config`: the main file's config in force, its own routes only.
        let hash = hash_files(&[&self.path]);
        let loaded = match permission_problem(&self.path) {
            Some(p) => Err(p),
            None => Config::load(&self.path).map_err(|e| e.to_string()),
        };
        match loaded {
            Ok(c) if hash.is_some() && c == **old_config => {
                // Touched, not changed; or put back as it was after a failed edit (or a
                // rollback: the refused content is gone, so nothing is pending any more).
                self.config_fp = fp;
                self.config_hash = hash;
                if self.main_refused.take().is_some() {
                    self.files_dirty = true;
                    shared
                        .metrics
                        .config_file(&self.path.display().to_string(), true, false);
                }
                if self.config_failure.take().is_some() {
                    tracing::info!("config is valid again (unchanged from the one in force)");
                    self.status
                        .config
                        .record(&shared.metrics, "config", true, Vec::new());
                    shared
                        .metrics
                        .config_file(&self.path.display().to_string(), true, false);
                }
            }
            Ok(_)
                if self.main_refused.is_some() && sha256_file(&self.path) == self.main_refused =>
            {
                // Rolled back by probation: the same content is not applied again.
                self.config_fp = fp;
                self.config_hash = hash;
            }
            Ok(c) => {
                self.main_refused = None;
                let c = keep_unreloadable(c, old_config);
                self.config_fp = fp;
                self.config_hash = hash;
                // `config_failure` stays until this config is published: a refusal later in the
                // poll (a claim, a bind) must compare against it to be reported only once.
                return Some(Arc::new(c));
            }
            Err(msg) => self.config_failed(&shared.metrics, fp, msg),
        }
        None
    }

    /// The certificate map to serve (rebuilt when it changed) and its rustls config. Err: why
    /// they cannot be served (a new config's upstream TLS settings that did not load, say).
    fn certs_and_tls(
        &mut self,
        config: &Config,
        shared: &Shared,
        certs_changed: bool,
        missing_tls: Option<String>,
    ) -> Result<(Arc<CertStore>, Arc<crate::tls::ServerTls>), String> {
        if let Some(msg) = missing_tls {
            return Err(msg);
        }
        let store = if certs_changed {
            self.assemble(config, &shared.tls)
                .map_err(|e| e.to_string())?
        } else {
            self.store
                .clone()
                .ok_or_else(|| "no certificate map yet".to_string())?
        };
        shared
            .tls
            .server_tls(store.clone(), &config.tls, &self.client_cas.roots())
            .map(|t| (store, t))
            .map_err(|e| format!("cannot build the TLS configuration: {e}"))
    }

    /// The route table to publish: rebuilt for a new config (or new upstream TLS material),
    /// else the one in force.
    fn routes_for(
        &self,
        shared: &Shared,
        new_config: Option<&Arc<Config>>,
        config: &Config,
        old_config: &Config,
        old_routes: Arc<RouteTable>,
        upstream_tls_changed: bool,
    ) -> Arc<RouteTable> {
        match new_config {
            None if upstream_tls_changed => Arc::new(RouteTable::build(
                &config.routes,
                config.timeouts.upstream_response,
                &shared.registry,
                &self.tls_configs(),
            )),
            Some(c) => {
                shared.registry.set_h2_keepalive(
                    c.timeouts.upstream_ping_interval,
                    c.timeouts.upstream_ping_timeout,
                );
                shared.registry.set_pool_idle(c.timeouts.upstream_idle);
                let r = Arc::new(RouteTable::build(
                    &c.routes,
                    c.timeouts.upstream_response,
                    &shared.registry,
                    &self.tls_configs(),
                ));
                tracing::info!(
                    "config reloaded: {}",
                    route_diff(&old_config.routes, &c.routes)
                );
                if labels_removed(&old_routes, &r) {
                    // Series of routes and upstreams that are gone would otherwise stay until
                    // restart; the others restart from zero, which rate() and increase() absorb.
                    shared.metrics.forget_routes();
                }
                r
            }
            None => old_routes,
        }
    }

    fn poll_with(&mut self, shared: &Shared, force_verify: bool) -> Option<u64> {
        self.judge_probation(shared);
        let failure_before = self.config_failure.as_ref().map(|(_, m)| m.clone());
        self.status.polls += 1;
        let mut published = self.poll_inner(shared, force_verify, true);
        if std::mem::take(&mut self.retry_without) {
            published = self.poll_inner(shared, false, false);
            self.retry_without = false;
        }
        self.rolling_back = false;
        // Rebuilt only when something moved: with 1,000 route files, copying every file's
        // state at every poll would cost more than the poll's own stat calls.
        let failure_after = self.config_failure.as_ref().map(|(_, m)| m);
        if published.is_some() || self.files_dirty || failure_before.as_ref() != failure_after {
            self.files_dirty = false;
            self.status.files = self.file_statuses();
            let mut errors: Vec<String> =
                self.config_failure.iter().map(|(_, m)| m.clone()).collect();
            errors.extend(
                self.status
                    .files
                    .iter()
                    .skip(1)
                    .filter_map(|f| f.error.clone()),
            );
            self.status.config.errors = errors;
        }
        published
    }

    /// Ends a probation whose window is over, or rolls its change back when its routes failed:
    /// the files it changed get their previous routes back (published by the poll that follows),
    /// and their current content is refused until they change.
    fn judge_probation(&mut self, shared: &Shared) {
        let Some(p) = &self.probation else {
            return;
        };
        let (answered, failed) = p.routes.iter().fold(p.carried, |(a, f), r| {
            let (ra, rf) = r.watch.counts();
            (a + ra, f + rf)
        });
        let bad = answered >= p.settings.min_requests
            && failed as f64 > p.settings.max_error_ratio * answered as f64;
        if !bad {
            if p.started.elapsed() >= p.settings.window {
                tracing::info!(
                    answered,
                    failed,
                    "config change kept: its probation window passed"
                );
                self.probation = None;
            }
            return;
        }
        let Some(p) = self.probation.take() else {
            return;
        };
        let labels: Vec<&str> = p.routes.iter().map(|r| &*r.label).collect();
        let reason = format!(
            "rolled back to generation {}: {failed} of {answered} requests failed",
            p.generation_before
        );
        tracing::error!(routes = ?labels, answered, failed, "config change rolled back by reload.probation: {reason}");
        let mut rolled: Vec<PathBuf> = Vec::new();
        if let (Some((before, sha)), Some(now)) = (&p.main_before, &self.main) {
            // The routes go back; the file's other settings (timeouts, listeners) stay.
            let mut restored = (**now).clone();
            restored.routes.clone_from(&before.routes);
            self.main = Some(Arc::new(restored));
            self.main_refused = std::mem::replace(&mut self.main_sha, sha.clone());
            rolled.push(self.path.clone());
        }
        for f in &p.files {
            if self.route_files.roll_back(f) {
                rolled.push(f.clone());
            }
        }
        for f in &rolled {
            let file = f.display().to_string();
            shared
                .metrics
                .config_rollbacks
                .get_or_create(&crate::metrics::FileLabel { file: file.clone() })
                .inc();
            shared.metrics.config_file(&file, true, true);
            self.status.event(
                self.generation + 1,
                "config",
                f,
                "rolled_back",
                reason.clone(),
            );
        }
        self.status.rolled_back = Some(crate::state::RollBack {
            generation: p.generation_before,
            at: SystemTime::now(),
            reason,
        });
        self.routes_pending = true;
        self.rolling_back = true;
    }

    /// Arms the routes a config change added or changed, and puts the change on probation
    /// (ending any earlier one: its changes stay).
    fn start_probation(
        &mut self,
        config: &Config,
        old: &Config,
        routes: &RouteTable,
        main_before: Option<(Arc<Config>, Option<String>)>,
        files: Vec<PathBuf>,
    ) {
        self.probation = None;
        let Some(settings) = config.reload.probation else {
            return;
        };
        let key = |r: &crate::config::RouteSpec| (r.host.clone(), r.path.clone());
        let before: HashMap<_, _> = old.routes.iter().map(|r| (key(r), r)).collect();
        let watched: Vec<Arc<crate::routing::Route>> = config
            .routes
            .iter()
            .zip(routes.routes())
            .filter(|(spec, _)| {
                before
                    .get(&key(spec))
                    .is_none_or(|o| route_changed(o, spec))
            })
            .map(|(_, r)| r.clone())
            .collect();
        if watched.is_empty() {
            return;
        }
        for r in &watched {
            r.watch.arm(true);
        }
        self.probation = Some(OnProbation {
            started: Instant::now(),
            settings,
            routes: watched,
            main_before,
            files,
            generation_before: self.generation.saturating_sub(1),
            carried: (0, 0),
        });
    }

    /// The same config's routes rebuilt (new upstream TLS material): the watch moves to the new
    /// routes of the same host and path, with what the old ones counted.
    fn rearm(&mut self, table: &RouteTable) {
        let Some(p) = &mut self.probation else {
            return;
        };
        let mut moved = Vec::with_capacity(p.routes.len());
        for old in &p.routes {
            let (a, f) = old.watch.counts();
            p.carried = (p.carried.0 + a, p.carried.1 + f);
            old.watch.arm(false);
            if let Some(new) = table
                .routes()
                .iter()
                .find(|r| r.host == old.host && r.path == old.path)
            {
                new.watch.arm(true);
                moved.push(new.clone());
            }
        }
        p.routes = moved;
    }

    /// The main file and every routes_dir file as served now.
    fn file_statuses(&self) -> Vec<crate::state::FileStatus> {
        let main = crate::state::FileStatus {
            file: self.path.clone(),
            sha256: self.main_sha.clone(),
            error: self.config_failure.as_ref().map(|(_, m)| m.clone()),
            pending: self.config_failure.is_some() || self.main_refused.is_some(),
            routes: self.main.as_ref().map_or(0, |m| m.routes.len()),
        };
        let mut v = vec![main];
        v.extend(self.route_files.statuses());
        v
    }

    /// A config change that cannot be published (its TLS settings, a listener that cannot be
    /// bound): the routes files it applied get their published state back. When the main file
    /// changed, it takes the blame and the files are read again at the next poll; otherwise the
    /// files it applied are the cause, and each is marked failed.
    fn unpublishable(
        &mut self,
        shared: &Shared,
        config: &Config,
        main_changed: bool,
        fp: Option<Fingerprint>,
        msg: String,
    ) {
        self.files_dirty = true;
        if main_changed {
            self.routes_pending = false;
            let _ = self.route_files.revert(&msg, |_| false);
            self.config_failed(&shared.metrics, fp, msg);
            return;
        }
        // The files whose routes cannot be served take the blame; the others are put back
        // unblamed and go out at once without them.
        let culprits = self.unservable_files(config);
        let routes::Reverted {
            failed,
            blamed,
            others,
        } = self.route_files.revert(&msg, |p| {
            p.file_name()
                .is_some_and(|n| culprits.iter().any(|c| **c == *n))
        });
        if !blamed {
            // Not the files' doing (a certificate, say): reported as such, once; the files
            // are read again at the next poll.
            if self.status.certs.errors != [msg.as_str()] {
                tracing::error!("reload failed, the previous snapshot stays in force: {msg}");
                self.status
                    .certs
                    .record(&shared.metrics, "cert", false, vec![msg]);
            }
        }
        self.files_refreshed(
            &routes::Outcome {
                failed,
                ..routes::Outcome::default()
            },
            &shared.metrics,
        );
        // A rollback in this poll must still go out, and so must the innocent files' changes.
        self.retry_without = blamed && (others || self.rolling_back);
        self.routes_pending = self.rolling_back;
    }

    /// Counts and records the failures a poll of the routes files met, each once.
    fn files_refreshed(&mut self, files: &routes::Outcome, metrics: &crate::metrics::Metrics) {
        for (file, msg) in &files.failed {
            metrics.config_file(&file.display().to_string(), false, true);
            metrics.reload("config", false);
            self.status.config.failures += 1;
            self.status
                .event(self.generation, "config", file, "failed", msg.clone());
        }
        for file in &files.recovered {
            metrics.config_file(&file.display().to_string(), true, false);
        }
        self.files_dirty |= !(files.failed.is_empty()
            && files.applied.is_empty()
            && files.removed.is_empty()
            && files.recovered.is_empty());
    }

    /// History events for the certificates a publish added, replaced or removed.
    fn cert_events(&mut self, old: Option<&CertStore>, new: &CertStore) {
        // Only the certificates that came or went are looked at: one that stayed is the same
        // allocation in both maps, so a change among 10,000 costs its own size, not 10,000 maps.
        let key = |c: &Arc<LoadedCert>| Arc::as_ptr(c) as usize;
        let before = old.map_or(&[][..], CertStore::certs);
        let had: FastSet<usize> = before.iter().map(key).collect();
        let kept: FastSet<usize> = new.certs().iter().map(key).collect();
        let gone: HashMap<&Path, &Arc<LoadedCert>> = before
            .iter()
            .filter(|c| !kept.contains(&key(c)))
            .map(|c| (c.cert_file.as_path(), c))
            .collect();
        let mut events = Vec::new();
        let mut still_there: HashSet<&Path> = HashSet::new();
        for c in new.certs().iter().filter(|c| !had.contains(&key(c))) {
            let names = c.names.join(",");
            match gone.get(c.cert_file.as_path()) {
                None => events.push((c.cert_file.clone(), format!("cert {names} added"))),
                Some(o) => {
                    still_there.insert(c.cert_file.as_path());
                    if o.sha256 != c.sha256 {
                        events.push((c.cert_file.clone(), format!("cert {names} replaced")));
                    }
                }
            }
        }
        for (file, c) in &gone {
            if !still_there.contains(file) {
                let names = c.names.join(",");
                events.push((file.to_path_buf(), format!("cert {names} removed")));
            }
        }
        events.sort();
        for (file, summary) in events {
            self.status
                .event(self.generation, "cert", &file, "applied", summary);
        }
    }

    fn poll_inner(
        &mut self,
        shared: &Shared,
        force_verify: bool,
        allow_verify: bool,
    ) -> Option<u64> {
        let (Some(old_main), Some(old_config), Some(old_routes)) =
            (self.main.clone(), self.config.clone(), self.routes.clone())
        else {
            return None;
        };

        // Config half: the main file, then each routes_dir file on its own.
        let fp = (self.stat)(&self.path);
        let (old_fp, old_hash) = (self.config_fp, self.config_hash);
        let verify = allow_verify
            && (force_verify || self.last_verify.elapsed() >= old_config.reload.verify_every);
        let mut config_changed =
            fp != self.config_fp || (verify && hash_files(&[&self.path]) != self.config_hash);
        if config_changed {
            if let Some((failed_fp, _)) = &self.config_failure {
                // Unchanged since it last failed: nothing new to try or to say.
                if *failed_fp == fp && fp.is_some() && !verify {
                    config_changed = false;
                }
            }
        }
        let mut new_main = if config_changed {
            self.load_changed_config(shared, fp, &old_main)
        } else {
            None
        };
        if let Some(m) = &new_main {
            // The main file's routes claim like any file's: a route another file serves
            // refuses the change whole.
            if let Err(e) = self.route_files.check_main(m) {
                self.config_fp = old_fp;
                self.config_hash = old_hash;
                // No fingerprint: tried again at every poll, since the other file may let go.
                self.config_failed(&shared.metrics, None, e.to_string());
                new_main = None;
            }
        }
        let main = new_main.clone().unwrap_or(old_main.clone());
        let files = self.route_files.refresh(&main, self.stat, verify);
        self.files_refreshed(&files, &shared.metrics);
        self.routes_pending |= files.changed;
        let new_config =
            (new_main.is_some() || self.routes_pending).then(|| self.route_files.served(&main));
        let config = new_config.clone().unwrap_or(old_config.clone());
        self.refresh_admin_token(&config, shared, verify);
        let _ = self.refresh_ticket_keys(&config, &shared.tls, Some(&shared.metrics), verify);

        // Cert half: always polled, whether or not the config changed.
        let (mut cert_errors, certs_dirty) = self.refresh_certs(&config, &shared.tls, verify);
        // Upstream TLS material counts as certificates: a rotated CA bundle or client cert
        // rebuilds the route table's pools, a broken one keeps the last good config.
        let (tls_errors, upstream_tls_changed) =
            self.refresh_upstream_tls(&[&old_config, &config], &shared.tls, verify);
        cert_errors.extend(tls_errors);
        // Client CA bundles count as certificates: a changed one rebuilds the TLS configs.
        let (ca_errors, cas_changed) = self.client_cas.refresh(
            &[&old_config, &config],
            self.stat,
            Some(&shared.metrics),
            verify,
        );
        // Counted and logged as `client_ca` by the refresh itself, not as certificate failures.
        drop(ca_errors);
        self.certs_pending |= cas_changed;
        // Sticky until published, like certs_pending.
        self.upstream_tls_pending |= upstream_tls_changed;
        let upstream_tls_changed = self.upstream_tls_pending;
        // A new config whose upstream TLS settings do not load is refused, as at start.
        let missing_tls = new_config.as_ref().and_then(|n| {
            self.missing_upstream_tls(n)
                .or_else(|| self.client_cas.missing(n))
        });
        // Sticky until published: a change whose publish failed is not forgotten by the next poll.
        self.certs_pending |= certs_dirty;
        let certs_changed = self.certs_pending
            || new_config
                .as_ref()
                .is_some_and(|n| n.tls != old_config.tls || n.routes != old_config.routes);
        if verify {
            self.last_verify = Instant::now();
        }

        let cert_msgs: Vec<String> = cert_errors.iter().map(ToString::to_string).collect();
        let certs_changed = certs_changed || upstream_tls_changed;
        if new_config.is_none() && !certs_changed {
            // Nothing to publish; a new failure is still a failed reload, counted once.
            if cert_msgs != self.status.certs.errors {
                self.status
                    .certs
                    .record(&shared.metrics, "cert", cert_msgs.is_empty(), cert_msgs);
            }
            return None;
        }

        let built = self.certs_and_tls(&config, shared, certs_changed, missing_tls);
        let (store, tls_cfg) = match built {
            Ok(x) => x,
            Err(msg) => {
                if new_config.is_some() {
                    // The new config cannot be served (say, default_cert names no loaded cert):
                    // it fails as a whole, and is tried again when the file changes. Reported
                    // once per distinct failure, like a config that does not parse.
                    self.config_fp = old_fp;
                    self.config_hash = old_hash;
                    self.unpublishable(shared, &config, new_main.is_some(), fp, msg);
                } else {
                    // Pending until published, so tried at every poll: reported once per message.
                    if self.status.certs.errors != [msg.as_str()] {
                        tracing::error!(
                            "certificate reload failed, the previous certificates stay in force: {msg}"
                        );
                        self.status
                            .certs
                            .record(&shared.metrics, "cert", false, vec![msg]);
                    }
                }
                return None;
            }
        };
        // The last step that can fail, before anything (pools, metrics) follows the new config.
        if let Err(msg) = bind_moved(
            &old_config.listen,
            &config.listen,
            shared,
            self.generation + 1,
        ) {
            self.config_fp = old_fp;
            self.config_hash = old_hash;
            self.unpublishable(shared, &config, new_main.is_some(), fp, msg);
            return None;
        }
        let old_routes_kept = old_routes.clone();
        let routes = self.routes_for(
            shared,
            new_config.as_ref(),
            &config,
            &old_config,
            old_routes,
            upstream_tls_changed,
        );
        self.generation += 1;
        let snapshot = Snapshot {
            generation: self.generation,
            config: config.clone(),
            routes: routes.clone(),
            certs: store.clone(),
            tls: tls_cfg,
        };
        // One store of a fully built snapshot: a request sees the old one or the new one, whole.
        shared.publish(snapshot);
        if new_config.is_none() && !Arc::ptr_eq(&routes, &old_routes_kept) {
            self.rearm(&routes);
        }
        if new_config.is_some() && !self.rolling_back {
            let files_applied = files.applied.iter().map(|(f, _)| f.clone()).collect();
            let main_before = new_main
                .as_ref()
                .map(|_| (old_main.clone(), self.main_sha.clone()));
            self.start_probation(&config, &old_config, &routes, main_before, files_applied);
        }
        let old_store = self.store.replace(store.clone());
        self.config = Some(config);
        self.routes = Some(routes);
        self.certs_pending = false;
        self.upstream_tls_pending = false;
        self.routes_pending = false;
        self.route_files.commit();
        for (file, _) in &files.applied {
            shared
                .metrics
                .config_file(&file.display().to_string(), true, false);
        }
        for file in &files.removed {
            shared.metrics.forget_file(&file.display().to_string());
        }
        if let Some(m) = new_main {
            self.config_failure = None;
            self.status
                .config
                .record(&shared.metrics, "config", true, Vec::new());
            self.main_sha = sha256_file(&self.path);
            shared
                .metrics
                .config_file(&self.path.display().to_string(), true, false);
            let summary = route_diff(&old_main.routes, &m.routes);
            let path = self.path.clone();
            self.status
                .event(self.generation, "config", &path, "applied", summary);
            self.main = Some(m);
        } else if new_config.is_some() {
            self.status
                .config
                .record(&shared.metrics, "config", true, Vec::new());
        }
        for (file, summary) in &files.applied {
            self.status
                .event(self.generation, "config", file, "applied", summary.clone());
        }
        for file in &files.removed {
            self.status.event(
                self.generation,
                "config",
                file,
                "applied",
                "file removed".into(),
            );
        }
        if certs_changed {
            self.cert_events(old_store.as_deref(), &store);
        }
        self.status.files = self.file_statuses();
        shared.metrics.config_files(
            self.status
                .files
                .iter()
                .filter_map(|f| Some((f.file.to_str()?, f.sha256.as_deref()?))),
        );
        if certs_changed {
            self.status
                .certs
                .record(&shared.metrics, "cert", cert_msgs.is_empty(), cert_msgs);
        }
        tracing::info!(
            generation = self.generation,
            config = new_config.is_some(),
            certs = certs_changed,
            "reloaded"
        );
        Some(self.generation)
    }
}

/// Warns of each expired certificate among `certs` (loaded anyway: an expired certificate is
/// still better than none for most clients' error pages).
fn warn_expired<'a>(certs: impl Iterator<Item = &'a Arc<LoadedCert>>) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for c in certs {
        if c.not_after < now {
            tracing::warn!(file = %c.cert_file.display(), names = ?c.names, "certificate has expired; loaded anyway, renew it");
        }
    }
}

/// The worker count is fixed for the life of the process (the runtime is built with it); a
/// reload that changes it applies the rest and says so.
fn keep_unreloadable(mut new: Config, old: &Config) -> Config {
    if new.workers != old.workers {
        tracing::warn!("workers changed in the config: takes effect at the next restart");
        new.workers = old.workers;
    }
    new
}

/// A listening socket as the server's own: address reuse on, so a port left in TIME_WAIT by a
/// listener moved away can be taken back; non-blocking, for the runtime.
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds the listen addresses `new` has and `old` had not, and leaves the sockets for the server
/// to take over once the config is published. Err: an address that cannot be bound; nothing is
/// left behind, and the listeners in force stay.
fn bind_moved(
    old: &crate::config::Listen,
    new: &crate::config::Listen,
    shared: &Shared,
    generation: u64,
) -> Result<(), String> {
    use crate::state::ListenerKind;
    let wanted = [
        (
            ListenerKind::Https,
            "https",
            Some(new.https),
            Some(old.https),
        ),
        (ListenerKind::Http, "http", new.http, old.http),
        (ListenerKind::Admin, "admin", new.admin, old.admin),
    ];
    let mut bound = Vec::new();
    for (kind, name, want, had) in wanted {
        let Some(addr) = want.filter(|_| want != had) else {
            continue;
        };
        let socket = bind_listener(addr).map_err(|e| {
            format!("cannot bind listen.{name} {addr}: {e}; the listeners in force stay, and so does the rest of the config until this is fixed")
        })?;
        bound.push((generation, kind, addr, socket));
    }
    if let Ok(mut h) = shared.handoff.lock() {
        h.extend(bound);
    }
    Ok(())
}

/// `routes +ADDED -REMOVED ~CHANGED` between two route lists, keyed by host and path.
fn route_diff(old: &[crate::config::RouteSpec], new: &[crate::config::RouteSpec]) -> String {
    let key = |r: &crate::config::RouteSpec| (r.host.to_string(), r.path.clone());
    let old_map: HashMap<_, _> = old.iter().map(|r| (key(r), r)).collect();
    let new_map: HashMap<_, _> = new.iter().map(|r| (key(r), r)).collect();
    let added = new_map.keys().filter(|k| !old_map.contains_key(*k)).count();
    let removed = old_map.keys().filter(|k| !new_map.contains_key(*k)).count();
    let changed = new_map
        .iter()
        .filter(|(k, r)| old_map.get(*k).is_some_and(|o| route_changed(o, r)))
        .count();
    format!("routes +{added} -{removed} ~{changed}")
}

/// Whether a route with the same host and path does something else now (its place in the file
/// does not count).
fn route_changed(o: &crate::config::RouteSpec, r: &crate::config::RouteSpec) -> bool {
    (
        &o.action,
        o.strip_prefix,
        o.timeout,
        &o.name,
        &o.upstream_tls,
    ) != (
        &r.action,
        r.strip_prefix,
        r.timeout,
        &r.name,
        &r.upstream_tls,
    ) || (o.balance, &o.health, o.passive, o.retry, &o.headers)
        != (r.balance, &r.health, r.passive, r.retry, &r.headers)
}

/// Whether a route label or an upstream address of `old` is missing from `new`.
fn labels_removed(old: &RouteTable, new: &RouteTable) -> bool {
    let labels = |t: &RouteTable| {
        let mut set: std::collections::HashSet<Arc<str>> = std::collections::HashSet::new();
        for r in t.routes() {
            set.insert(r.label.clone());
            if let crate::routing::Action::Proxy(g) = &r.action {
                for u in g.members() {
                    set.insert(Arc::from(format!("upstream {}", u.upstream.authority)));
                }
            }
        }
        set
    };
    let new_labels = labels(new);
    labels(old).iter().any(|l| !new_labels.contains(l))
}

/// Messages to the reload thread.
pub enum Command {
    /// Poll now (SIGHUP).
    Poll,
}

/// Runs the poller on its own thread until `commands` is closed. File I/O never blocks the
/// runtime's workers this way, and one thread means reloads never race each other.
pub fn spawn(
    mut reloader: Reloader,
    shared: Arc<Shared>,
    commands: std::sync::mpsc::Receiver<Command>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("limen-reload".into())
        .spawn(move || loop {
            let interval = shared.snapshot.load().config.reload.interval;
            let forced = match commands.recv_timeout(interval) {
                Ok(Command::Poll) => true,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // A bug in one poll must not end reloading for the life of the process.
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                reloader.poll_with(&shared, forced)
            }));
            if polled.is_err() {
                tracing::error!(
                    "a reload poll panicked; the served state is unchanged and polling goes on"
                );
            }
            if let Ok(mut s) = shared.reload_status.lock() {
                s.clone_from(&reloader.status);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_metadata_difference_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a").unwrap();
        let a = fingerprint(&p).unwrap();
        std::fs::write(&p, "b").unwrap();
        let b = fingerprint(&p).unwrap();
        // Same size, possibly the same second: nanoseconds and ctime still tell them apart.
        assert_ne!(a, b);
        assert!(fingerprint(&dir.path().join("missing")).is_none());
    }

    /// A stat that never sees a change, as with a writer that restores every metadata field.
    fn frozen(_: &Path) -> Option<Fingerprint> {
        Some(Fingerprint {
            mtime: (1, 0),
            ctime: (1, 0),
            size: 1,
            ino: 1,
            dev: 1,
        })
    }

    fn shared_for(snapshot: Snapshot, tls: TlsShared) -> Shared {
        Shared::new(snapshot, tls, UpstreamRegistry::default())
    }

    fn body_of(shared: &Shared) -> String {
        let snap = shared.snapshot.load();
        match &snap.routes.lookup("a.test", "/").map(|r| &r.action) {
            Some(crate::routing::Action::Respond { body, .. }) => {
                String::from_utf8_lossy(body).into_owned()
            }
            _ => String::new(),
        }
    }

    #[test]
    fn the_hash_safety_net_sees_changes_that_metadata_hides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        let yaml = |body: &str| {
            format!("listen: {{https: \"127.0.0.1:0\"}}\ntls: {{self_signed: true}}\nreload: {{verify_every: 200ms}}\nroutes:\n  - {{host: a.test, respond: {{body: {body}}}}}\n")
        };
        std::fs::write(&path, yaml("AAAA")).unwrap();
        let tls = TlsShared::new().unwrap();
        let mut r = Reloader::with_stat(&path, frozen);
        let snap = r.initial_load(&tls, &UpstreamRegistry::default()).unwrap();
        let shared = shared_for(snap, tls);
        assert_eq!(body_of(&shared), "AAAA");

        std::fs::write(&path, yaml("BBBB")).unwrap();
        // Metadata alone says nothing changed, and the hash check is not due yet.
        assert_eq!(r.poll(&shared), None);
        assert_eq!(body_of(&shared), "AAAA");
        // Once verify_every has passed, the contents' hash gives the change away.
        let due = Instant::now() + Duration::from_millis(200);
        let mut published = None;
        while published.is_none() && Instant::now() < due + Duration::from_secs(2) {
            published = r.poll(&shared);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(published, Some(2));
        assert!(Instant::now() >= due, "it must wait for verify_every");
        assert_eq!(body_of(&shared), "BBBB");
    }
}
