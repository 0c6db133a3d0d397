//! `reload.probation`: a config change whose new or changed routes fail is rolled back.
//!
//! Owns: `OnProbation` (the routes armed to count their answers, what to put back), judging it at
//! every poll, and moving the watch when the same routes are rebuilt. Must not touch: publishing
//! (a rollback marks the routes pending; the poll that follows publishes them like any change).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::Reloader;
use crate::config::{diff, Config};
use crate::routing::RouteTable;
use crate::state::Shared;

/// A config change on probation: the routes it added or changed (armed to count their answers),
/// the files it changed, and what to put back.
pub(super) struct OnProbation {
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
impl Reloader {
    /// Ends a probation whose window is over, or rolls its change back when its routes failed:
    /// the files it changed get their previous routes back (published by the poll that follows),
    /// and their current content is refused until they change.
    pub(super) fn judge_probation(&mut self, shared: &Shared) {
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
        if let (Some((before, sha)), Some(now)) = (&p.main_before, self.main.good().cloned()) {
            // The routes go back; the file's other settings (timeouts, listeners) stay.
            let mut restored = (*now).clone();
            restored.routes.clone_from(&before.routes);
            self.main.set_good(Some(Arc::new(restored)));
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
    pub(super) fn start_probation(
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
        // The routes the one typed diff says this change added or changed.
        let touched: std::collections::HashSet<diff::RouteKey> = diff::routes_touched(&diff::diff(
            &diff::View::from_config(old),
            &diff::View::from_config(config),
        ))
        .into_iter()
        .collect();
        let watched: Vec<Arc<crate::routing::Route>> = config
            .routes
            .iter()
            .zip(routes.routes())
            .filter(|(spec, _)| touched.contains(&spec.key()))
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
    pub(super) fn rearm(&mut self, table: &RouteTable) {
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
                .find(|r| r.host == old.host && r.path == old.path && r.matcher == old.matcher)
            {
                new.watch.arm(true);
                moved.push(new.clone());
            }
        }
        p.routes = moved;
    }
}
