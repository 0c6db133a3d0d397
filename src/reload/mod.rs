//! Snapshots and passive hot reload: building the immutable state that handshakes and requests
//! read, and rebuilding it when files change on disk.
//!
//! A poll is one transaction, read top to bottom in its files: `plan` (read what changed, parse,
//! build the candidate) -> `validate` (every gate; listeners bound but not handed over) ->
//! `publish` (the one store of the snapshot) -> `commit` (hand listeners over, install secrets,
//! probation, history, status, metrics). Nothing outside the reloader changes before publish, so
//! a refusal at any gate leaves every observable thing as it was.
//!
//! Owns: the initial load (strict: any problem is fatal), the metadata poller (one thread, the only
//! writer of the published snapshot after start), every watched file (`watched::Watched`), the
//! last good version of each, and the reload facts the admin listener shows. Must not touch:
//! sockets or live connections; a published snapshot is never modified, only replaced.

mod certs;
mod client_ca;
mod commit;
mod listeners;
mod plan;
mod probation;
mod routes;
mod secrets;
mod standing;
mod status;
mod upstream_tls;
mod users;
mod watched;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::config::{Config, ConfigError, UpstreamTls};
use crate::routing::RouteTable;
use crate::state::{ReloadStatus, Shared, Snapshot};
use crate::tls::{CertSource, CertStore, LoadedCert, TlsError, TlsShared};
use crate::upstream::UpstreamRegistry;

pub use listeners::{bind_listener, bind_udp};
pub use watched::{fingerprint, Fingerprint, StatFn};

use probation::OnProbation;

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

/// The TLS material a published snapshot was built with, by the files it came from: a poll
/// compares what the config to serve would use with it, instead of carrying "changed" flags.
#[derive(Default)]
struct Material {
    upstream_tls: crate::upstream::TlsConfigs,
    cas: HashMap<PathBuf, Arc<rustls::RootCertStore>>,
    users: users::UsersFiles,
}

impl Reloader {
    /// What `config` uses of the watched TLS material now.
    fn tls_material(&self, config: &Config) -> Material {
        Material {
            upstream_tls: self.upstream_tls_for(config),
            cas: self.client_cas.roots_for(config),
            users: self.users_for(config),
        }
    }
}

pub(super) use crate::state::FastHasher as PathHasher;

pub(super) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<PathHasher>>;

/// Loads the config file and every certificate, keeps what it learnt about each file, and turns
/// later changes on disk into new snapshots.
pub struct Reloader {
    path: PathBuf,
    stat: StatFn,
    /// The main file: its fingerprint and hash, the config in force from it (its own routes
    /// only; the version published, not the last one parsed), and its current problem.
    main: watched::Watched<Config>,
    /// SHA-256 of the main file's content served.
    main_sha: Option<String>,
    /// The main file's version read for the candidate (fingerprint, hash, SHA-256): what `main`
    /// records once the candidate commits.
    candidate: Option<(Option<Fingerprint>, u64, String)>,
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
    /// Hashed, not ordered: `Path`'s ordering walks components and costs a poll over 10,000
    /// pairs several milliseconds.
    certs: FastMap<CertSource, certs::WatchedCert>,
    /// How many cert polls have run: each marks the pairs it listed (`WatchedCert::seen`).
    cert_polls: u64,
    dir_errors: BTreeMap<PathBuf, String>,
    /// The files of every `upstream_tls` block in force, with the last good client config built
    /// from them.
    upstream_tls: HashMap<UpstreamTls, upstream_tls::WatchedUpstreamTls>,
    /// The development certificate and the hosts it was made for; regenerated only when those change.
    self_signed: Option<(Vec<String>, Arc<LoadedCert>)>,
    store: Option<Arc<CertStore>>,
    last_verify: Instant,
    /// The certificate set changed since the last publish.
    certs_pending: bool,
    /// The TLS material the published snapshot was built with.
    published: Material,
    generation: u64,
    pub status: ReloadStatus,
    /// `listen.admin_token_file` and `tls.ticket_keys`: read by `plan`, installed by `commit`.
    secrets: secrets::Secrets,
    /// The CA bundles of `tls.client_auth`.
    client_cas: client_ca::ClientCas,
    /// The users files of routes with `auth.basic`, with their last good users.
    users: HashMap<PathBuf, users::WatchedUsers>,
    /// Rate-limit buckets, kept across configs that keep a route's label and `rate_limit`.
    limiters: crate::ratelimit::Limiters,
    /// What has been said about standing conditions (uncovered hosts, expired certificates).
    standing: standing::Standing,
    /// A test hook: panic between publish and commit, the worst place for a poll to die.
    #[cfg(test)]
    panic_after_publish: bool,
}

impl Reloader {
    pub fn new(path: &Path) -> Reloader {
        Reloader::with_stat(path, fingerprint)
    }

    pub fn with_stat(path: &Path, stat: StatFn) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            stat,
            main: watched::Watched::default(),
            main_sha: None,
            candidate: None,
            route_files: routes::RouteFiles::default(),
            routes_pending: false,
            probation: None,
            rolling_back: false,
            files_dirty: false,
            retry_without: false,
            main_refused: None,
            config: None,
            routes: None,
            certs: FastMap::default(),
            cert_polls: 0,
            dir_errors: BTreeMap::new(),
            upstream_tls: HashMap::new(),
            self_signed: None,
            store: None,
            last_verify: Instant::now(),
            certs_pending: false,
            published: Material::default(),
            generation: 0,
            status: ReloadStatus::default(),
            secrets: secrets::Secrets::default(),
            client_cas: client_ca::ClientCas::default(),
            users: HashMap::new(),
            limiters: crate::ratelimit::Limiters::default(),
            standing: standing::Standing::default(),
            #[cfg(test)]
            panic_after_publish: false,
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
        crate::state::lock(&shared.reload_status).clone_from(&self.status);
    }

    /// A fingerprint of each secret in force (`listen.admin_token_file`, `tls.ticket_keys`), by
    /// config key: what `--check --diff` compares, never the content.
    pub fn secret_fingerprints(&self) -> std::collections::BTreeMap<String, String> {
        self.secrets.fingerprints()
    }

    /// The admin token loaded, if `listen.admin_token_file` is set.
    pub fn admin_token(&self) -> Option<Arc<Vec<u8>>> {
        self.secrets.admin_token()
    }

    /// The first load: every problem is fatal, so limen starts with all it was told to serve or
    /// not at all.
    pub fn initial_load(
        &mut self,
        tls: &TlsShared,
        registry: &UpstreamRegistry,
    ) -> Result<Snapshot, LoadError> {
        let fp = (self.stat)(&self.path);
        let read = watched::read_config_text(&self.path)?;
        let main = Arc::new(Config::parse(&read.text, &self.path)?);
        self.route_files.load_all(&main, self.stat)?;
        let config = self.route_files.served(&main);
        self.secrets.refresh(&[&config], self.stat, false, None);
        self.refresh_users(&[&config], false, None);
        if let Some(msg) = self
            .secrets
            .missing(&config)
            .or_else(|| self.missing_users(&config))
        {
            return Err(LoadError::Config(ConfigError::Refused(msg)));
        }
        // Before any listener serves: the admin guard takes the token from `admin_token()`.
        self.secrets.install(
            &config,
            &secrets::Targets {
                admin_token: None,
                tls,
                metrics: None,
            },
        );
        self.status.secrets = self.secrets.fingerprints();
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
        registry.set_h2_limits(
            config.limits.upstream_h2_streams,
            config.limits.upstream_h2_connections,
        );
        registry.set_header_limit(config.limits.max_header_bytes);
        let routes = Arc::new(RouteTable::build(
            &config.routes,
            config.timeouts.upstream_response,
            &self.inputs(registry, &self.tls_configs(), &self.users_for(&config)),
        ));
        self.main.accept(vec![fp], read.hash, main);
        self.main_sha = Some(read.sha256);
        self.published = self.tls_material(&config);
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

    /// One poll: looks at every watched file and publishes a new snapshot if anything changed and
    /// the new state is valid. Returns the new generation when one was published.
    pub fn poll(&mut self, shared: &Shared) -> Option<u64> {
        self.poll_with(shared, false)
    }

    fn poll_with(&mut self, shared: &Shared, force_verify: bool) -> Option<u64> {
        self.judge_probation(shared);
        let failure_before = self.main.error().map(str::to_owned);
        self.status.polls += 1;
        self.route_files.rearm();
        let mut published = self.transact(shared, force_verify, true);
        if std::mem::take(&mut self.retry_without) {
            published = self.transact(shared, false, false);
            self.retry_without = false;
        }
        self.rolling_back = false;
        // Rebuilt only when something moved: with 1,000 route files, copying every file's
        // state at every poll would cost more than the poll's own stat calls.
        let failure_after = self.main.error();
        if published.is_some() || self.files_dirty || failure_before.as_deref() != failure_after {
            self.files_dirty = false;
            self.status.files = self.file_statuses();
            let mut errors: Vec<String> =
                self.main.error().into_iter().map(str::to_owned).collect();
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

    /// A poll that cannot take the reload thread down: a panic inside it is logged, and the
    /// reloader rebuilds its state from the snapshot in force instead of going on half-mutated.
    pub fn poll_guarded(&mut self, shared: &Shared, forced: bool) -> Option<u64> {
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.poll_with(shared, forced)
        }));
        match polled {
            Ok(published) => published,
            Err(_) => {
                tracing::error!("a reload poll panicked; the served state is unchanged, every watched file is read again at the next poll, and polling goes on");
                self.recover(shared);
                None
            }
        }
    }

    /// After a panic: what is in force is the published snapshot, whatever the reloader had
    /// half-done. Its config, routes and certificate map are taken back, and every file is
    /// marked to be read and checked again, so the next poll publishes only what passes every
    /// gate, from the files as they are.
    fn recover(&mut self, shared: &Shared) {
        let snap = shared.snapshot.load_full();
        self.generation = self.generation.max(snap.generation);
        self.config = Some(snap.config.clone());
        self.routes = Some(snap.routes.clone());
        self.store = Some(snap.certs.clone());
        // The main file's config in force stays; its fingerprint is forgotten, so it is read
        // again and compared.
        let main = self.main.good().cloned();
        self.main = watched::Watched::default();
        self.main.set_good(main);
        self.candidate = None;
        self.probation = None;
        self.rolling_back = false;
        self.retry_without = false;
        // Rebuilt from the watchers' last good values at the next poll, through validate.
        self.routes_pending = true;
        self.certs_pending = true;
        // Compared with the watchers' values at the next poll: anything differs, so it rebuilds.
        self.published = Material::default();
        self.files_dirty = true;
        let _ = self.route_files.revert("", |_| false, false);
    }
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
            reloader.poll_guarded(&shared, forced);
            crate::state::lock(&shared.reload_status).clone_from(&reloader.status);
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        match &snap
            .routes
            .lookup(
                "a.test",
                "/",
                &crate::routing::Facts::of(&http::Request::new(())),
            )
            .map(|r| &r.action)
        {
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

    /// A poll that dies between publish and commit (the reloader then disagrees with what is
    /// served) must not leave it half-mutated: the next good change applies, and the state it
    /// publishes is whole.
    #[test]
    fn a_poll_that_panics_leaves_the_reloader_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        let yaml = |body: &str| {
            format!("listen: {{https: \"127.0.0.1:0\"}}\ntls: {{self_signed: true}}\nroutes:\n  - {{host: a.test, respond: {{body: {body}}}}}\n")
        };
        std::fs::write(&path, yaml("AAAA")).unwrap();
        let tls = TlsShared::new().unwrap();
        let mut r = Reloader::new(&path);
        let snap = r.initial_load(&tls, &UpstreamRegistry::default()).unwrap();
        let shared = shared_for(snap, tls);

        r.panic_after_publish = true;
        std::fs::write(&path, yaml("BBBB")).unwrap();
        assert_eq!(r.poll_guarded(&shared, false), None, "the poll died");
        r.panic_after_publish = false;
        // Published before the panic; the reloader took that snapshot back as the one in force.
        assert_eq!(body_of(&shared), "BBBB");
        let generation = shared.snapshot.load().generation;

        std::fs::write(&path, yaml("CCCC")).unwrap();
        let mut published = None;
        for _ in 0..3 {
            published = published.or(r.poll_guarded(&shared, false));
        }
        assert!(published.is_some_and(|g| g > generation), "{published:?}");
        assert_eq!(body_of(&shared), "CCCC");
        assert_eq!(shared.snapshot.load().generation, r.generation);
        // And nothing is left pending: a quiet poll publishes nothing.
        assert_eq!(r.poll_guarded(&shared, false), None);
    }
}
