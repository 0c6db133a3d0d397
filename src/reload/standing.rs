//! Warnings about standing conditions: a route host no certificate covers, an expired
//! certificate served anyway, a `workers` change that waits for a restart. Each is said when it
//! appears or changes, not again at every reload while it stands (a routine reload every few
//! seconds would otherwise bury everything else in the log).
//!
//! Owns: what has been said. Must not touch: whether a config is served (these are warnings).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::tls::{LoadedCert, TlsError};

#[derive(Default)]
pub(super) struct Standing {
    /// The route hosts no certificate covered at the last assembly.
    uncovered: HashSet<String>,
    /// Expired certificates already warned of, by file and expiry (a renewal is a new one).
    expired: HashSet<(PathBuf, i64)>,
    /// The `workers` value last said to wait for a restart (None: the config's; Some(None):
    /// unset, that is one per core).
    workers: Option<Option<usize>>,
}

impl Standing {
    /// Warns of each host in `hosts` that was covered (or not routed) at the last assembly.
    pub(super) fn uncovered(&mut self, hosts: Vec<String>) {
        for host in &hosts {
            if !self.uncovered.contains(host) {
                tracing::warn!("{}", TlsError::Uncovered { host: host.clone() });
            }
        }
        self.uncovered = hosts.into_iter().collect();
    }

    /// Warns of each expired certificate among `certs` not warned of before (loaded anyway: an
    /// expired certificate is still better than none for most clients' error pages).
    pub(super) fn expired<'a>(&mut self, certs: impl Iterator<Item = &'a Arc<LoadedCert>>) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        for c in certs.filter(|c| c.not_after < now) {
            if self.expired.insert((c.cert_file.clone(), c.not_after)) {
                tracing::warn!(file = %c.cert_file.display(), names = ?c.names, "certificate has expired; loaded anyway, renew it");
            }
        }
    }

    /// Says once per distinct value that a config's `workers` differs from the running count.
    pub(super) fn workers(&mut self, wanted: Option<usize>, running: Option<usize>) {
        if wanted == running {
            self.workers = None;
        } else if self.workers != Some(wanted) {
            self.workers = Some(wanted);
            tracing::warn!(
                workers = ?wanted,
                running = ?running,
                "workers changed in the config: takes effect at the next restart"
            );
        }
    }
}
