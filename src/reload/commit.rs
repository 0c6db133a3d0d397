//! The last two steps of a poll: `publish` builds the route table and stores the one snapshot
//! (the only store after start), and `commit` makes everything else follow it: listeners handed
//! over, secrets installed, probation started, history, status and metrics recorded.
//!
//! Owns: the order of side effects after the gates. Must not touch: anything before `validate`
//! has passed (the caller runs publish and commit only on a `Ready`).

use std::sync::Arc;

use super::listeners::hand_over;
use super::plan::{Plan, Ready};
use super::secrets::Targets;
use super::Reloader;
use crate::config::{diff, Config};
use crate::routing::RouteTable;
use crate::state::{Shared, Snapshot};
use crate::tls::CertStore;

impl Reloader {
    /// One poll as a transaction: plan, validate, publish, commit. Returns the new generation
    /// when one was published.
    pub(super) fn transact(
        &mut self,
        shared: &Shared,
        force_verify: bool,
        allow_verify: bool,
    ) -> Option<u64> {
        let plan = self.plan(shared, force_verify, allow_verify)?;
        if plan.is_empty() {
            self.settle(shared, &plan);
            return None;
        }
        let ready = match self.validate(shared, &plan) {
            Ok(r) => r,
            Err(msg) => {
                self.refuse(shared, &plan, msg);
                return None;
            }
        };
        let (routes, old_store) = self.publish(shared, &plan, ready);
        #[cfg(test)]
        if self.panic_after_publish {
            panic!("test hook: a poll dies between publish and commit");
        }
        self.commit(shared, plan, routes, old_store);
        Some(self.generation)
    }

    /// A poll with nothing to publish: a new certificate problem is still a failed reload,
    /// counted once; a secret file of the config in force that changed alone is installed (the
    /// config it belongs to passed every gate when it was published).
    fn settle(&mut self, shared: &Shared, plan: &Plan) {
        if plan.cert_msgs != self.status.certs.errors {
            self.status.certs.record(
                &shared.metrics,
                "cert",
                plan.cert_msgs.is_empty(),
                plan.cert_msgs.clone(),
            );
        }
        if self.secrets.pending(&plan.old_config) {
            self.install_secrets(shared, &plan.old_config);
        }
    }

    fn install_secrets(&mut self, shared: &Shared, config: &Config) {
        self.secrets.install(
            config,
            &Targets {
                admin_token: Some(&shared.admin_token),
                tls: &shared.tls,
                metrics: Some(&shared.metrics),
            },
        );
        self.status.secrets = self.secrets.fingerprints();
    }

    /// Builds the route table (when the config or its upstream TLS material changed) and stores
    /// the new snapshot: a request sees the old one or the new one, whole. The moved listeners'
    /// sockets go to the hand-over list first, tagged with the generation: the server takes
    /// them only once it sees that generation published.
    fn publish(
        &mut self,
        shared: &Shared,
        plan: &Plan,
        ready: Ready,
    ) -> (Arc<RouteTable>, Option<Arc<CertStore>>) {
        let routes = self.routes_for(
            shared,
            plan.new_config.as_ref(),
            &plan.config,
            &plan.old_config,
            plan.old_routes.clone(),
            plan.upstream_tls_changed,
        );
        self.generation += 1;
        // Secrets go in with the snapshot, before any listener of it: an edit that adds the admin
        // listener and its token together must never serve that listener unguarded, not even for
        // the moment between the store and `commit` (every check has passed by now).
        self.install_secrets(shared, &plan.config);
        hand_over(ready.bound, shared);
        let old_store = self.store.replace(ready.store.clone());
        shared.publish(Snapshot {
            generation: self.generation,
            config: plan.config.clone(),
            routes: routes.clone(),
            certs: ready.store,
            tls: ready.tls,
        });
        (routes, old_store)
    }

    /// Everything that follows a publish, in one place.
    fn commit(
        &mut self,
        shared: &Shared,
        plan: Plan,
        routes: Arc<RouteTable>,
        old_store: Option<Arc<CertStore>>,
    ) {
        let Plan {
            old_main,
            old_config,
            old_routes,
            new_main,
            files,
            new_config,
            config,
            cert_msgs,
            certs_changed,
            ..
        } = plan;
        if new_config.is_none() && !Arc::ptr_eq(&routes, &old_routes) {
            self.rearm(&routes);
        }
        if new_config.is_some() && !self.rolling_back {
            let files_applied = files.applied.iter().map(|(f, _)| f.clone()).collect();
            let main_before = new_main
                .as_ref()
                .map(|_| (old_main.clone(), self.main_sha.clone()));
            self.start_probation(&config, &old_config, &routes, main_before, files_applied);
        }
        self.published = self.tls_material(&config);
        self.config = Some(config);
        self.routes = Some(routes);
        self.certs_pending = false;
        self.routes_pending = false;
        self.route_files.commit();
        self.record_commit(shared, &old_main, new_main, new_config.is_some(), &files);
        if certs_changed {
            if let Some(store) = self.store.clone() {
                self.cert_events(old_store.as_deref(), &store);
            }
            self.status
                .certs
                .record(&shared.metrics, "cert", cert_msgs.is_empty(), cert_msgs);
        }
        self.status.files = self.file_statuses();
        shared.metrics.config_files(
            self.status
                .files
                .iter()
                .filter_map(|f| Some((f.file.to_str()?, f.sha256.as_deref()?))),
        );
        tracing::info!(
            generation = self.generation,
            config = new_config.is_some(),
            certs = certs_changed,
            "reloaded"
        );
    }

    /// History, status and metrics of the config files a commit applied.
    fn record_commit(
        &mut self,
        shared: &Shared,
        old_main: &Config,
        new_main: Option<Arc<Config>>,
        config_changed: bool,
        files: &super::routes::Outcome,
    ) {
        for (file, _) in &files.applied {
            shared
                .metrics
                .config_file(&file.display().to_string(), true, false);
        }
        for file in &files.removed {
            shared.metrics.forget_file(&file.display().to_string());
        }
        if let Some(m) = new_main {
            self.status
                .config
                .record(&shared.metrics, "config", true, Vec::new());
            // The fingerprint and hashes of the very text that was parsed and is now served.
            if let Some((fp, hash, sha)) = self.candidate.take() {
                self.main.accept(vec![fp], hash, m.clone());
                self.main_sha = Some(sha);
            }
            shared
                .metrics
                .config_file(&self.path.display().to_string(), true, false);
            let summary = diff::summary(&diff::diff(
                &diff::View::from_config(old_main),
                &diff::View::from_config(&m),
            ));
            let path = self.path.clone();
            self.status
                .event(self.generation, "config", &path, "applied", summary);
        } else if config_changed {
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
                &self.inputs(
                    &shared.registry,
                    &self.tls_configs(),
                    &self.users_for(config),
                ),
            )),
            Some(c) => {
                shared.registry.set_h2_keepalive(
                    c.timeouts.upstream_ping_interval,
                    c.timeouts.upstream_ping_timeout,
                );
                shared.registry.set_pool_idle(c.timeouts.upstream_idle);
                shared.registry.set_h2_limits(
                    c.limits.upstream_h2_streams,
                    c.limits.upstream_h2_connections,
                );
                shared.registry.set_header_limit(c.limits.max_header_bytes);
                let r = Arc::new(RouteTable::build(
                    &c.routes,
                    c.timeouts.upstream_response,
                    &self.inputs(&shared.registry, &self.tls_configs(), &self.users_for(c)),
                ));
                tracing::info!(
                    "config reloaded: {}",
                    diff::summary(&diff::diff(
                        &diff::View::from_config(old_config),
                        &diff::View::from_config(c),
                    ))
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
