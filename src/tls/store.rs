//! The certificate map of one snapshot: name -> `LoadedCert`, with the default served when SNI
//! is missing or unknown, built whole (`new`) or from the previous map and a change (`updated`).
//!
//! Owns: which certificate serves a name (exact, then the wildcard one label up, then the
//! default; of two claimants, the one expiring last), and which route hosts no certificate
//! covers. Must not touch: files or parsing (`certs`), rustls configs (`server`), the published
//! snapshot, sockets.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::{LoadedCert, TlsError};
use crate::config::{HostPattern, RouteSpec};

/// The certificate map of one snapshot: name -> cert, plus the default.
#[derive(Default)]
pub struct CertStore {
    /// Keys shared with the next store built from this one (`updated` clones the map, not
    /// the names).
    by_name: HashMap<Arc<str>, Arc<LoadedCert>>,
    default: Option<Arc<LoadedCert>>,
    certs: Vec<Arc<LoadedCert>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("certs", &self.certs)
            .finish()
    }
}

impl CertStore {
    /// Adds every certificate to a typed-diff view: names, not-after (RFC 3339), SHA-256.
    pub fn add_to_view(&self, view: &mut crate::config::diff::View) {
        for c in self.certs() {
            let names: Vec<&str> = c.names.iter().map(String::as_str).collect();
            let not_after = time::OffsetDateTime::from_unix_timestamp(c.not_after)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            view.add_cert(&names, Some(not_after), Some(c.sha256.clone()));
        }
    }
}

impl CertStore {
    /// Builds the map. When two certs claim a name, the one expiring last wins; of two expiring
    /// together, the one earlier in `certs`.
    pub fn new(certs: Vec<Arc<LoadedCert>>) -> CertStore {
        let mut by_name: HashMap<Arc<str>, Arc<LoadedCert>> = HashMap::new();
        for cert in &certs {
            for name in &cert.names {
                claim(&mut by_name, name, cert);
            }
        }
        CertStore {
            by_name,
            default: None,
            certs,
        }
    }

    /// This store with the certificates `gone` (by identity, `Arc::as_ptr`) taken out and `came`
    /// put in at their place in path order: the map `new` would build from the resulting list,
    /// when this store's list is in path order, at the cost of the change rather than of the
    /// whole map (one changed certificate among 10,000: 13 ms rebuilt, well under 1 ms this way).
    /// The default is not carried over.
    pub fn updated(
        &self,
        gone: &std::collections::HashSet<usize, impl std::hash::BuildHasher>,
        mut came: Vec<Arc<LoadedCert>>,
    ) -> CertStore {
        let key = |c: &Arc<LoadedCert>| Arc::as_ptr(c) as usize;
        // Owned: few, and `came` moves into the list below.
        let mut affected: std::collections::HashSet<String> = std::collections::HashSet::new();
        for c in self.certs.iter().filter(|c| gone.contains(&key(c))) {
            affected.extend(c.names.iter().cloned());
        }
        for c in &came {
            affected.extend(c.names.iter().cloned());
        }
        let mut certs: Vec<Arc<LoadedCert>> = self
            .certs
            .iter()
            .filter(|c| !gone.contains(&key(c)))
            .cloned()
            .collect();
        came.sort_by(|a, b| a.cert_file.as_os_str().cmp(b.cert_file.as_os_str()));
        for c in came {
            let at = certs.partition_point(|x| x.cert_file.as_os_str() < c.cert_file.as_os_str());
            certs.insert(at, c);
        }
        let mut by_name = self.by_name.clone();
        for name in &affected {
            by_name.remove(name.as_str());
        }
        // Every claimant of an affected name, in list order: the same winner `new` would pick.
        for cert in &certs {
            for name in &cert.names {
                if affected.contains(name) {
                    claim(&mut by_name, name, cert);
                }
            }
        }
        CertStore {
            by_name,
            default: None,
            certs,
        }
    }

    /// Logs, for every name two or more certificates claim, which one is served.
    pub fn log_choices(&self) {
        self.log_choices_of(self.certs.iter());
    }

    /// The same, for names of `certs` only (the ones a reload brought).
    pub fn log_choices_of<'a>(&self, certs: impl Iterator<Item = &'a Arc<LoadedCert>>) {
        for cert in certs {
            for name in &cert.names {
                if let Some(chosen) = self.by_name.get(name.as_str()) {
                    if !Arc::ptr_eq(chosen, cert) {
                        tracing::info!(name, chosen = %chosen.cert_file.display(), other = %cert.cert_file.display(),
                            "two certificates serve this name; using the one that expires last");
                    }
                }
            }
        }
    }

    /// Sets the cert served when SNI is missing or unknown; it must cover `name`.
    pub fn set_default(&mut self, name: &str) -> Result<(), TlsError> {
        let cert = self
            .find(name)
            .cloned()
            .ok_or_else(|| TlsError::NoDefault {
                name: name.to_string(),
            })?;
        self.default = Some(cert);
        Ok(())
    }

    /// The cert for a name: exact, then the wildcard one label up.
    pub fn find(&self, name: &str) -> Option<&Arc<LoadedCert>> {
        if let Some(c) = self.by_name.get(name) {
            return Some(c);
        }
        let (_, parent) = name.split_once('.')?;
        let mut key = String::with_capacity(parent.len() + 2);
        key.push_str("*.");
        key.push_str(parent);
        self.by_name.get(key.as_str())
    }

    /// What a handshake with this SNI is served: exact, wildcard, then the default.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<LoadedCert>> {
        match sni {
            Some(name) => self.find(name).or(self.default.as_ref()),
            None => self.default.as_ref(),
        }
    }

    pub fn certs(&self) -> &[Arc<LoadedCert>] {
        &self.certs
    }

    pub fn default_cert(&self) -> Option<&Arc<LoadedCert>> {
        self.default.as_ref()
    }

    pub fn covers(&self, host: &str) -> bool {
        self.find(host).is_some()
    }
}

/// `cert` takes `name` unless the holder expires no earlier.
fn claim(by_name: &mut HashMap<Arc<str>, Arc<LoadedCert>>, name: &str, cert: &Arc<LoadedCert>) {
    match by_name.get_mut(name) {
        Some(prev) if prev.not_after >= cert.not_after => {}
        Some(prev) => *prev = cert.clone(),
        None => {
            by_name.insert(Arc::from(name), cert.clone());
        }
    }
}

/// The names a self-signed cert must cover for the routes no loaded cert covers.
pub fn uncovered_route_hosts(store: &CertStore, routes: &[RouteSpec]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in routes {
        let name = match &r.host {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Wildcard(p) => format!("*.{p}"),
            HostPattern::Any => "localhost".to_string(),
        };
        let covered = match &r.host {
            HostPattern::Wildcard(_) => store.by_name.contains_key(name.as_str()),
            _ => store.covers(&name),
        };
        if !covered && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::self_signed;
    use super::*;

    /// `updated` must give the very map `new` builds from the resulting list: same winner for
    /// every name (ties on notAfter included) and the same path order, over many random edits.
    #[test]
    fn updated_store_equals_rebuilt_store() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = self_signed(&["x.test".to_string()], &provider)
            .map(|c| c.key)
            .expect("a generated key");
        let pool = [
            "a.test", "b.test", "c.test", "*.d.test", "e.d.test", "f.test",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |m: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % m
        };
        let cert = |next: &mut dyn FnMut(u64) -> u64| {
            let n = next(3) as usize + 1;
            let names = (0..n)
                .map(|_| pool[next(pool.len() as u64) as usize].to_string())
                .collect();
            Arc::new(LoadedCert {
                key: key.clone(),
                names,
                not_after: next(3) as i64,
                cert_file: PathBuf::from(format!("/certs/{:02}.crt", next(40))),
                key_file: PathBuf::new(),
                sha256: String::new(),
                serial: String::new(),
            })
        };
        let sorted = |mut v: Vec<Arc<LoadedCert>>| {
            v.sort_by(|a, b| a.cert_file.as_os_str().cmp(b.cert_file.as_os_str()));
            v.dedup_by(|a, b| a.cert_file == b.cert_file);
            v
        };
        let mut list = sorted((0..12).map(|_| cert(&mut next)).collect());
        let mut store = CertStore::new(list.clone());
        for round in 0..300 {
            let key_of = |c: &Arc<LoadedCert>| Arc::as_ptr(c) as usize;
            let mut gone = std::collections::HashSet::new();
            for c in &list {
                if next(4) == 0 {
                    gone.insert(key_of(c));
                }
            }
            let mut kept: Vec<Arc<LoadedCert>> = list
                .iter()
                .filter(|c| !gone.contains(&key_of(c)))
                .cloned()
                .collect();
            let mut came = Vec::new();
            for _ in 0..next(4) {
                let c = cert(&mut next);
                if !kept.iter().chain(&came).any(|k| k.cert_file == c.cert_file) {
                    came.push(c);
                }
            }
            kept.extend(came.iter().cloned());
            list = sorted(kept);
            store = store.updated(&gone, came);
            let rebuilt = CertStore::new(list.clone());
            assert_eq!(store.certs().len(), rebuilt.certs().len(), "round {round}");
            for (a, b) in store.certs().iter().zip(rebuilt.certs()) {
                assert!(Arc::ptr_eq(a, b), "round {round}: list order");
            }
            for name in pool.iter().chain(&["z.d.test", "none.test"]) {
                let (a, b) = (store.find(name), rebuilt.find(name));
                assert_eq!(a.is_some(), b.is_some(), "round {round}: {name}");
                if let (Some(a), Some(b)) = (a, b) {
                    assert!(Arc::ptr_eq(a, b), "round {round}: winner of {name}");
                }
            }
        }
    }
}
