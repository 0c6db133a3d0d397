//! The CA bundles of `tls.client_auth`, watched like the serving certificates: re-read when their
//! metadata (or, at a verify poll, their contents) change, until two reads agree; a bundle that
//! does not load keeps the last good one.
//!
//! Owns: `ClientCas`. Must not touch: building the TLS configs (tls does, from `roots`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{hash_files, permission_problem, Fingerprint, StatFn};
use crate::config::Config;
use crate::tls::TlsError;

#[derive(Default)]
struct WatchedCa {
    fp: Option<Fingerprint>,
    hash: Option<u64>,
    roots: Option<Arc<rustls::RootCertStore>>,
    error: Option<String>,
}

#[derive(Default)]
pub(super) struct ClientCas {
    cas: HashMap<PathBuf, WatchedCa>,
}

fn read_stable(path: &Path) -> Result<Vec<u8>, TlsError> {
    if let Some(reason) = permission_problem(path) {
        return Err(TlsError::Read {
            path: path.to_path_buf(),
            reason,
        });
    }
    super::read_stable(path, || crate::tls::read(path))
}

impl ClientCas {
    /// The roots of every bundle that loaded.
    pub fn roots(&self) -> HashMap<PathBuf, Arc<rustls::RootCertStore>> {
        self.cas
            .iter()
            .filter_map(|(p, w)| Some((p.clone(), w.roots.clone()?)))
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
                let loaded = self.cas.get(&spec.ca).is_some_and(|w| w.roots.is_some());
                (!loaded).then(|| {
                    format!(
                        "tls.client_auth[{i}]: its CA bundle {} did not load",
                        spec.ca.display()
                    )
                })
            })
    }

    /// Re-reads the bundles `configs` name that changed. Problems are logged once each (when
    /// `metrics` is given: not at start, where they are fatal). True: a bundle's roots changed.
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
        let (mut errors, mut changed) = (Vec::new(), false);
        for path in wanted {
            let fp = stat(path);
            let entry = self.cas.entry(path.to_path_buf()).or_default();
            let stale = entry.roots.is_none()
                || entry.error.is_some()
                || entry.fp != fp
                || (verify && hash_files(&[path]) != entry.hash);
            if !stale {
                continue;
            }
            let loaded = read_stable(path).and_then(|pem| {
                // The hash of the very bytes parsed: a second read could see a newer file.
                let hash = Some(super::hash_bytes(&[&pem]));
                crate::tls::client_ca_roots(&pem, path).map(|r| (r, hash))
            });
            match loaded {
                Ok((roots, hash)) => {
                    let new = entry.hash != hash || entry.error.is_some() || entry.roots.is_none();
                    if new && entry.roots.is_some() {
                        tracing::info!(file = %path.display(), "client CA bundle reloaded");
                        if let Some(m) = metrics {
                            m.reload("client_ca", true);
                        }
                    }
                    changed |= new;
                    entry.roots = Some(roots);
                    entry.error = None;
                    entry.fp = fp;
                    entry.hash = hash;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if entry.error.as_deref() != Some(msg.as_str()) {
                        if let Some(m) = metrics {
                            m.reload("client_ca", false);
                            if entry.roots.is_some() {
                                tracing::error!("{msg}; handshakes keep the last good CA bundle");
                            } else {
                                tracing::error!("{msg}");
                            }
                        }
                        entry.error = Some(msg);
                    }
                    errors.push(e);
                }
            }
        }
        (errors, changed)
    }
}
