//! The first two steps of a poll: `plan` reads what changed and builds the candidate (config,
//! files, certificates, secrets) without touching anything outside the reloader; `validate` runs
//! every gate and yields what a publish needs (the certificate map, the TLS configs, listeners
//! bound but not yet handed over). A refusal at any gate leaves every observable thing as it was.
//!
//! Owns: `Plan`, `Ready`, and refusing a change. Must not touch: the published snapshot, the
//! admin guard, the ticketer, the upstream registry, the server's listeners.

use std::sync::Arc;
use std::time::Instant;

use super::listeners::{bind_moved, Bound};
use super::watched::{read_config_text, Fingerprint};
use super::{routes, Reloader};
use crate::config::Config;
use crate::routing::RouteTable;
use crate::state::Shared;
use crate::tls::CertStore;

/// What a poll found and would apply.
pub(super) struct Plan {
    /// What is in force: the main file's own config, the served config, the route table.
    pub old_main: Arc<Config>,
    pub old_config: Arc<Config>,
    pub old_routes: Arc<RouteTable>,
    /// The main file's fingerprint now.
    pub fp: Option<Fingerprint>,
    /// The main file's new config, when it changed.
    pub new_main: Option<Arc<Config>>,
    /// What the routes_dir files did.
    pub files: routes::Outcome,
    /// The config to serve when it differs from the one in force; `config` is the one that
    /// will be served either way.
    pub new_config: Option<Arc<Config>>,
    pub config: Arc<Config>,
    /// The certificate problems met (each logged once by its watcher).
    pub cert_msgs: Vec<String>,
    /// The certificate map or the server TLS configs must be rebuilt.
    pub certs_changed: bool,
    /// Upstream TLS material changed: the route table's pools must be rebuilt.
    pub upstream_tls_changed: bool,
    /// Why the new config cannot be served, found while planning (a file it names that did
    /// not load).
    pub missing: Option<String>,
}

impl Plan {
    /// Nothing to publish: no new config, no new certificate or TLS material.
    pub fn is_empty(&self) -> bool {
        self.new_config.is_none() && !self.certs_changed
    }
}

/// What passed every gate: all a publish needs, nothing yet visible outside the reloader.
pub(super) struct Ready {
    pub store: Arc<CertStore>,
    pub tls: Arc<crate::tls::ServerTls>,
    /// Listeners the change moves, bound; closed if dropped.
    pub bound: Bound,
}

impl Reloader {
    /// Reads every watched file that changed and builds the candidate. None: nothing is in force
    /// yet (no initial load).
    pub(super) fn plan(
        &mut self,
        shared: &Shared,
        force_verify: bool,
        allow_verify: bool,
    ) -> Option<Plan> {
        let (Some(old_main), Some(old_config), Some(old_routes)) = (
            self.main.good().cloned(),
            self.config.clone(),
            self.routes.clone(),
        ) else {
            return None;
        };
        let fp = (self.stat)(&self.path);
        let verify = allow_verify
            && (force_verify || self.last_verify.elapsed() >= old_config.reload.verify_every);
        let new_main = self.plan_main(shared, fp, verify, &old_main);
        let main = new_main.clone().unwrap_or(old_main.clone());
        let files = self.route_files.refresh(&main, self.stat, verify);
        self.files_refreshed(&files, &shared.metrics);
        self.routes_pending |= files.changed;
        let new_config =
            (new_main.is_some() || self.routes_pending).then(|| self.route_files.served(&main));
        let config = new_config.clone().unwrap_or(old_config.clone());
        let (cert_msgs, certs_changed, upstream_tls_changed) =
            self.plan_certs(shared, &old_config, &new_config, verify);
        // A new config is served only with every file it names: a secret, an upstream TLS block
        // or a client CA bundle that did not load refuses it whole, as at start.
        let missing = new_config.as_ref().and_then(|n| {
            self.secrets
                .missing(n)
                .or_else(|| self.missing_upstream_tls(n))
                .or_else(|| self.missing_users(n))
                .or_else(|| self.client_cas.missing(n))
        });
        if verify {
            self.last_verify = Instant::now();
        }
        Some(Plan {
            old_main,
            old_config,
            old_routes,
            fp,
            new_main,
            files,
            new_config,
            config,
            cert_msgs,
            certs_changed,
            upstream_tls_changed,
            missing,
        })
    }

    /// The main file, read again when its metadata (or, at a verify poll, its content) changed.
    /// Some: a new config whose routes claim nothing another file holds.
    fn plan_main(
        &mut self,
        shared: &Shared,
        fp: Option<Fingerprint>,
        verify: bool,
        old_main: &Arc<Config>,
    ) -> Option<Arc<Config>> {
        // Unchanged since it last failed: nothing new to try or to say.
        if !self.main.due(&[&self.path], &[fp], verify) {
            return None;
        }
        let m = self.load_changed_config(shared, fp, old_main)?;
        // The main file's routes claim like any file's: a route another file serves refuses
        // the change whole.
        if let Err(e) = self.route_files.check_main(&m) {
            // No fingerprint: tried again at every poll, since the other file may let go.
            self.config_failed(&shared.metrics, None, e.to_string());
            return None;
        }
        Some(m)
    }

    /// The certificate half: the serving pairs, upstream TLS blocks, client CA bundles and
    /// secrets the config in force and the candidate name, read again where they changed.
    /// Returns the certificate problems, whether the certificate map or TLS configs must be
    /// rebuilt, and whether the route table's upstream TLS material changed.
    fn plan_certs(
        &mut self,
        shared: &Shared,
        old_config: &Arc<Config>,
        new_config: &Option<Arc<Config>>,
        verify: bool,
    ) -> (Vec<String>, bool, bool) {
        let config = new_config.as_ref().unwrap_or(old_config);
        let both: Vec<&Config> = std::iter::once(&**old_config)
            .chain(new_config.as_deref())
            .collect();
        self.secrets
            .refresh(&both, self.stat, verify, Some(&shared.metrics));
        self.refresh_users(&both, verify, Some(&shared.metrics));
        let (mut cert_errors, certs_dirty) = self.refresh_certs(config, &shared.tls, verify);
        // Upstream TLS material counts as certificates: a rotated CA bundle or client cert
        // rebuilds the route table's pools, a broken one keeps the last good config.
        let (tls_errors, _) = self.refresh_upstream_tls(&both, &shared.tls, verify);
        cert_errors.extend(tls_errors);
        // Client CA bundles count as certificates: a changed one rebuilds the TLS configs.
        // Their problems are counted and logged as `client_ca` by the refresh itself.
        let _ = self
            .client_cas
            .refresh(&both, self.stat, Some(&shared.metrics), verify);
        // Sticky until published: a change whose publish failed is not forgotten by the next poll.
        self.certs_pending |= certs_dirty;
        // The TLS material the config to serve uses, against what the published snapshot was
        // built with: material only a refused candidate named changes neither.
        // A users file is route-table material like upstream TLS: a changed one rebuilds the
        // table (and with it the verified-credential cache, which lives in the users).
        let upstream_tls_changed =
            !same_arcs(&self.upstream_tls_for(config), &self.published.upstream_tls)
                || !same_arcs(&self.users_for(config), &self.published.users);
        let cas_changed = !same_arcs(&self.client_cas.roots_for(config), &self.published.cas);
        let certs_changed = self.certs_pending
            || cas_changed
            || upstream_tls_changed
            || new_config
                .as_ref()
                .is_some_and(|n| n.tls != old_config.tls || n.routes != old_config.routes);
        let cert_msgs = cert_errors.iter().map(ToString::to_string).collect();
        (cert_msgs, certs_changed, upstream_tls_changed)
    }

    /// Every gate a change must pass before anything follows it: the files it names loaded,
    /// the certificate map and TLS configs build (`default_cert` covered), the listeners it
    /// moves bind. The last one, so a socket is bound only for a change that passed the rest.
    pub(super) fn validate(&mut self, shared: &Shared, plan: &Plan) -> Result<Ready, String> {
        if let Some(msg) = &plan.missing {
            return Err(msg.clone());
        }
        let (store, tls) = self.certs_and_tls(&plan.config, shared, plan.certs_changed)?;
        let bound = bind_moved(
            &plan.old_config.listen,
            &plan.config.listen,
            self.generation + 1,
        )?;
        Ok(Ready { store, tls, bound })
    }

    /// A change that did not pass a gate: nothing it brought is installed; the failure is
    /// reported once per distinct message, and the change is tried again when its files change.
    pub(super) fn refuse(&mut self, shared: &Shared, plan: &Plan, msg: String) {
        if plan.new_config.is_some() {
            // The new config cannot be served (say, default_cert names no loaded cert): it
            // fails as a whole, and is tried again when the file changes.
            // Refused for a file it names (a secret, a CA bundle) rather than for its own
            // content: tried again at every poll, so fixing that file is enough.
            let fp = if plan.missing.is_some() {
                None
            } else {
                plan.fp
            };
            let each_poll = plan.missing.is_some();
            self.unpublishable(
                shared,
                &plan.config,
                plan.new_main.is_some(),
                fp,
                msg,
                each_poll,
            );
        } else if self.status.certs.errors != [msg.as_str()] {
            // Pending until published, so tried at every poll: reported once per message.
            tracing::error!(
                "certificate reload failed, the previous certificates stay in force: {msg}"
            );
            self.status
                .certs
                .record(&shared.metrics, "cert", false, vec![msg]);
        }
    }

    /// The certificate map to serve (rebuilt when it changed) and its rustls config. Err: why
    /// they cannot be served.
    fn certs_and_tls(
        &mut self,
        config: &Config,
        shared: &Shared,
        certs_changed: bool,
    ) -> Result<(Arc<CertStore>, Arc<crate::tls::ServerTls>), String> {
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

    /// Reads the config file that changed on disk. Some: a new config to apply; None: it was only
    /// touched (or put back as it was), or it failed (reported once, the old one stays).
    fn load_changed_config(
        &mut self,
        shared: &Shared,
        fp: Option<Fingerprint>,
        old_config: &Arc<Config>,
    ) -> Option<Arc<Config>> {
        // `old_config`: the main file's config in force, its own routes only.
        let read = read_config_text(&self.path);
        let (hash, sha) = match &read {
            Ok(t) => (Some(t.hash), Some(t.sha256.clone())),
            Err(_) => (None, None),
        };
        let loaded = read
            .and_then(|t| Config::parse(&t.text, &self.path))
            .map_err(|e| e.to_string());
        match (loaded, hash, sha) {
            (Ok(c), Some(hash), _) if c == **old_config => {
                // Touched, not changed; or put back as it was after a failed edit (or a
                // rollback: the refused content is gone, so nothing is pending any more).
                let recovered = self.main.touch(vec![fp], hash);
                if self.main_refused.take().is_some() {
                    self.files_dirty = true;
                    shared
                        .metrics
                        .config_file(&self.path.display().to_string(), true, false);
                }
                if recovered {
                    tracing::info!("config is valid again (unchanged from the one in force)");
                    self.status
                        .config
                        .record(&shared.metrics, "config", true, Vec::new());
                    shared
                        .metrics
                        .config_file(&self.path.display().to_string(), true, false);
                }
            }
            (Ok(_), Some(hash), Some(sha)) if self.main_refused.as_ref() == Some(&sha) => {
                // Rolled back by probation: the same content is not applied again.
                self.main.skip(vec![fp], hash);
            }
            (Ok(c), Some(hash), Some(sha)) => {
                self.main_refused = None;
                let c = self.keep_unreloadable(c, old_config);
                // Recorded by the commit: until then the main file's problem (if any) stays,
                // so a refusal later in the poll (a claim, a bind) is reported only once.
                self.candidate = Some((fp, hash, sha));
                return Some(Arc::new(c));
            }
            (Ok(_), _, _) => {}
            (Err(msg), _, _) => self.config_failed(&shared.metrics, fp, msg),
        }
        None
    }
}

/// Whether two maps hold the very same values (by identity: a watcher keeps a value's `Arc`
/// until its files change).
pub(super) fn same_arcs<K: Eq + std::hash::Hash, V>(
    a: &std::collections::HashMap<K, Arc<V>>,
    b: &std::collections::HashMap<K, Arc<V>>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| Arc::ptr_eq(v, w)))
}

impl Reloader {
    /// The worker count is fixed for the life of the process (the runtime is built with it); a
    /// reload that changes it applies the rest and says so, once per value.
    fn keep_unreloadable(&mut self, mut new: Config, old: &Config) -> Config {
        self.standing.workers(new.workers, old.workers);
        new.workers = old.workers;
        new
    }
}
