//! The CA bundles of `tls.client_auth`, each a `Watched` file like the serving certificates:
//! re-read when their metadata (or, at a verify poll, their contents) change, until two reads
//! agree; a bundle that does not load keeps the last good one.
//!
//! Owns: `ClientCas`. Must not touch: building the TLS configs (the commit step does, from
//! `roots`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::certs::unstable;
use super::watched::{hash_bytes, permission_problem, read_stable, Refresh, StatFn, Watched};
use crate::config::Config;
use crate::tls::TlsError;

#[derive(Default)]
pub(super) struct ClientCas {
    cas: HashMap<PathBuf, Watched<Arc<rustls::RootCertStore>>>,
}

fn load(path: &Path) -> Result<(Arc<rustls::RootCertStore>, u64), TlsError> {
    if let Some(reason) = permission_problem(path) {
        return Err(TlsError::Read {
            path: path.to_path_buf(),
            reason,
        });
    }
    let pem = read_stable(|| crate::tls::read(path), || unstable(path))?;
    // The hash of the very bytes parsed: a second read could see a newer file.
    let hash = hash_bytes(&[&pem]);
    crate::tls::client_ca_roots(&pem, path).map(|r| (r, hash))
}

impl ClientCas {
    /// The roots of every bundle that loaded.
    pub fn roots(&self) -> HashMap<PathBuf, Arc<rustls::RootCertStore>> {
        self.cas
            .iter()
            .filter_map(|(p, w)| Some((p.clone(), Arc::clone(&**w.good()?))))
            .collect()
    }

    /// The roots of the bundles `config` names that loaded.
    pub fn roots_for(&self, config: &Config) -> HashMap<PathBuf, Arc<rustls::RootCertStore>> {
        config
            .tls
            .client_auth
            .iter()
            .filter_map(|s| {
                let w = self.cas.get(&s.ca)?;
                Some((s.ca.clone(), Arc::clone(&**w.good()?)))
            })
            .collect()
    }

    /// Why `config` cannot be served for want of a client CA bundle, if it cannot.
    pub fn missing(&self, config: &Config) -> Option<String> {
        config
            .tls
            .client_auth
            .iter()
            .enumerate()
            .find_map(|(i, spec)| {
                let loaded = self.cas.get(&spec.ca).is_some_and(|w| w.good().is_some());
                (!loaded).then(|| {
                    format!(
                        "tls.client_auth[{i}]: its CA bundle {} did not load",
                        spec.ca.display()
                    )
                })
            })
    }

    /// Re-reads the bundles `configs` name that changed. Problems are logged once each (when
    /// `metrics` is given: not at start, where they are fatal). True: the roots of a bundle the
    /// config to serve (the last of `configs`) uses changed; one only a refused candidate names
    /// is kept warm, but rebuilds nothing.
    pub fn refresh(
        &mut self,
        configs: &[&Config],
        stat: StatFn,
        metrics: Option<&crate::metrics::Metrics>,
        verify: bool,
    ) -> (Vec<TlsError>, bool) {
        let wanted: HashSet<&Path> = configs
            .iter()
            .flat_map(|c| c.tls.client_auth.iter())
            .map(|s| s.ca.as_path())
            .collect();
        self.cas.retain(|p, _| wanted.contains(p.as_path()));
        let serving = |path: &Path| {
            configs
                .last()
                .is_some_and(|c| c.tls.client_auth.iter().any(|s| s.ca == path))
        };
        let (mut errors, mut changed) = (Vec::new(), false);
        for path in wanted {
            let entry = self.cas.entry(path.to_path_buf()).or_default();
            let had = entry.good().is_some();
            match entry.refresh(&[path], stat, verify, || load(path)) {
                Refresh::Unchanged => {}
                Refresh::Loaded { .. } => {
                    if had {
                        tracing::info!(file = %path.display(), "client CA bundle reloaded");
                        if let Some(m) = metrics {
                            m.reload("client_ca", true);
                        }
                    }
                    changed |= serving(path);
                }
                Refresh::Failed { error, new } => {
                    if let Some(m) = metrics.filter(|_| new) {
                        m.reload("client_ca", false);
                        if had {
                            tracing::error!("{error}; handshakes keep the last good CA bundle");
                        } else {
                            tracing::error!("{error}");
                        }
                    }
                    errors.push(error);
                }
            }
        }
        (errors, changed)
    }
}
