//! What the reloader reports: failures (each once per distinct content), the files' states for
//! `/status.json`, and the refusal of a change that cannot be published.
//!
//! Owns: turning outcomes into log lines, metrics and history events. Must not touch: the
//! published snapshot, or anything a refusal must leave as it was.

use super::watched::Fingerprint;
use super::{routes, Reloader};
use crate::config::Config;
use crate::state::Shared;

impl Reloader {
    /// A config that cannot be applied: logged and counted once per distinct failure, however often
    /// the same file is read again; remembered with its fingerprint so an unchanged file is skipped.
    pub(super) fn config_failed(
        &mut self,
        metrics: &crate::metrics::Metrics,
        fp: Option<Fingerprint>,
        msg: String,
    ) {
        // A missing file (no fingerprint) is read again at every poll; a version that failed on
        // its content, once it changes.
        let at = fp.is_some().then(|| vec![fp]);
        if self.main.fail(at, msg.clone()) {
            tracing::error!("config reload failed, the previous routes stay in force: {msg}");
            self.status
                .config
                .record(metrics, "config", false, vec![msg.clone()]);
            metrics.config_file(&self.path.display().to_string(), false, true);
            let path = self.path.clone();
            self.status
                .event(self.generation, "config", &path, "failed", msg.clone());
        }
    }

    /// The main file and every routes_dir file as served now.
    pub(super) fn file_statuses(&self) -> Vec<crate::state::FileStatus> {
        let main = crate::state::FileStatus {
            file: self.path.clone(),
            sha256: self.main_sha.clone(),
            error: self.main.error().map(str::to_owned),
            pending: self.main.error().is_some() || self.main_refused.is_some(),
            routes: self.main.good().map_or(0, |m| m.routes.len()),
        };
        let mut v = vec![main];
        v.extend(self.route_files.statuses());
        v
    }

    /// A config change that cannot be published (its TLS settings, a listener that cannot be
    /// bound): the routes files it applied get their published state back. When the main file
    /// changed, it takes the blame and the files are read again at the next poll; otherwise the
    /// files it applied are the cause, and each is marked failed.
    pub(super) fn unpublishable(
        &mut self,
        shared: &Shared,
        config: &Config,
        main_changed: bool,
        fp: Option<Fingerprint>,
        msg: String,
        each_poll: bool,
    ) {
        self.files_dirty = true;
        if main_changed {
            self.routes_pending = false;
            let _ = self.route_files.revert(&msg, |_| false, false);
            self.config_failed(&shared.metrics, fp, msg);
            return;
        }
        // The files whose routes cannot be served take the blame; the others are put back
        // unblamed and go out at once without them.
        let mut culprits = self.unservable_files(config);
        culprits.extend(self.files_without_users(config));
        let routes::Reverted {
            failed,
            blamed,
            others,
        } = self.route_files.revert(
            &msg,
            |p| {
                p.file_name()
                    .is_some_and(|n| culprits.iter().any(|c| **c == *n))
            },
            each_poll,
        );
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
    pub(super) fn files_refreshed(
        &mut self,
        files: &routes::Outcome,
        metrics: &crate::metrics::Metrics,
    ) {
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
}
