//! The serving certificates: every pair the cert dirs list, each watched as one `Watched` file
//! set, and the certificate map built from their last good versions.
//!
//! Owns: `WatchedCert`, retiring pairs that are gone, assembling the `CertStore` (from the one in
//! force, at the cost of what changed), the development certificate, and the history events of
//! certificates that came or went. Must not touch: the published snapshot (the commit step
//! publishes what `assemble` built).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::watched::{
    hash_bytes, permission_problem, read_stable, world_readable, Refresh, StatFn, Watched,
};
use super::{LoadError, Reloader};
use crate::config::Config;
use crate::state::FastSet;
use crate::tls::{CertSource, CertStore, LoadedCert, TlsError, TlsShared};

/// The error of files that kept changing while being read.
pub(super) fn unstable(path: &Path) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        reason: "the files kept changing while being read; will retry at the next poll".into(),
    }
}

/// One certificate pair the poller watches.
pub(super) struct WatchedCert {
    /// The pair's files, the last version that loaded cleanly (served until a better one loads)
    /// and the current problem.
    file: Watched<LoadedCert>,
    /// Consecutive polls in which neither file of the pair existed.
    gone_polls: u32,
    warned_readable: bool,
    /// The last poll that listed this pair: one not listed by the current one is retired.
    seen: u64,
}

impl WatchedCert {
    pub(super) fn good(&self) -> Option<&Arc<LoadedCert>> {
        self.file.good()
    }

    /// Reads the pair again when its files changed and records the outcome: the new version, or
    /// the error (logged once per distinct message) with the last good version kept. Returns the
    /// error, and whether the set of good certificates changed. `announce`: log additions (not
    /// at the initial load).
    fn refresh(
        &mut self,
        src: &CertSource,
        tls: &TlsShared,
        stat: StatFn,
        verify: bool,
        announce: bool,
    ) -> (Option<TlsError>, bool) {
        let load = || {
            if let Some(reason) = [&src.cert, &src.key]
                .into_iter()
                .find_map(|p| permission_problem(p))
            {
                return Err(TlsError::Read {
                    path: src.cert.clone(),
                    reason,
                });
            }
            let (c, k) = read_pair_stable(src)?;
            let loaded = crate::tls::parse_pair(&c, &k, src, tls.provider())?;
            Ok((loaded, hash_bytes(&[&c, &k])))
        };
        let had = self.file.good().is_some();
        match self
            .file
            .refresh(&[&src.cert, &src.key], stat, verify, load)
        {
            Refresh::Unchanged => (None, false),
            Refresh::Loaded { recovered, .. } => {
                if let Some(loaded) = self.file.good() {
                    if had {
                        tracing::info!(file = %src.cert.display(), names = ?loaded.names, "certificate replaced");
                    } else if announce {
                        tracing::info!(file = %src.cert.display(), names = ?loaded.names, "certificate added");
                    }
                }
                if !self.warned_readable && world_readable(&src.key) {
                    self.warned_readable = true;
                    tracing::warn!(file = %src.key.display(), "private key is world-readable; chmod 0400 it (Kubernetes: defaultMode: 0440 on the secret volume with an fsGroup, or 0400 when limen runs as the files' owner)");
                }
                if recovered {
                    tracing::info!(file = %src.cert.display(), "certificate loads again");
                }
                (None, true)
            }
            Refresh::Failed { error, new } => {
                if new {
                    match self.file.good() {
                        Some(g) => {
                            tracing::error!(names = ?g.names, "{error}; still serving the last good version")
                        }
                        None => tracing::error!("{error}"),
                    }
                }
                (Some(error), false)
            }
        }
    }
}

/// Reads a pair until two reads in a row agree, so a file caught mid-write is never parsed as
/// whole. Bounded, like Envoy's retry on watched secrets.
pub(super) fn read_pair_stable(src: &CertSource) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    use crate::tls::read;
    read_stable(
        || Ok((read(&src.cert)?, read(&src.key)?)),
        || unstable(&src.cert),
    )
}

impl Reloader {
    /// Re-lists the cert dirs and re-reads every pair whose files changed (or whose contents
    /// changed, when `verify` asks for hashes). Returns the problems met; each is logged once,
    /// when it first appears.
    /// The second value says whether the set of good certificates changed.
    pub(super) fn refresh_certs(
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
            let entry = self
                .certs
                .entry(src.clone())
                .or_insert_with(|| WatchedCert {
                    file: Watched::default(),
                    gone_polls: 0,
                    warned_readable: false,
                    seen: this_poll,
                });
            entry.seen = this_poll;
            entry.gone_polls = 0;
            let (err, changed) = entry.refresh(src, tls, self.stat, verify, self.generation > 0);
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
    pub(super) fn retire_unlisted(&mut self, this_poll: u64, config: &Config) -> bool {
        let mut dirty = false;
        let listed_dirs: Vec<&Path> = config.tls.cert_dirs.iter().map(PathBuf::as_path).collect();
        let mut removed = Vec::new();
        for (src, entry) in self.certs.iter_mut() {
            if entry.seen == this_poll {
                continue;
            }
            let in_config =
                listed_dirs.iter().any(|d| src.cert.starts_with(d)) && entry.good().is_some();
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
                if entry.file.error() != Some(msg.as_str()) {
                    tracing::warn!("{msg}");
                    entry.file.note(msg);
                }
            } else if !c && !k {
                entry.gone_polls += 1;
                if entry.gone_polls >= 2 {
                    removed.push(src.clone());
                } else if entry.file.error().is_none() {
                    entry.file.note("removed".into());
                    tracing::warn!(file = %src.cert.display(), "certificate pair deleted; still serving it until it has been gone for two polls");
                }
            } else {
                entry.gone_polls = 0;
                let names = entry.good().map(|g| g.names.clone()).unwrap_or_default();
                let msg = if c && k {
                    format!("{}: no longer listed in its directory; still serving the last good certificate for {names:?}", src.cert.display())
                } else {
                    format!(
                        "{}: deleted; still serving the last good certificate for {names:?} until the pair is complete again",
                        if c { src.key.display() } else { src.cert.display() },
                    )
                };
                if entry.file.error() != Some(msg.as_str()) {
                    tracing::warn!("{msg}");
                    entry.file.note(msg);
                }
            }
        }
        for src in removed {
            if let Some(e) = self.certs.remove(&src) {
                if let Some(g) = e.good() {
                    dirty = true;
                    tracing::info!(file = %src.cert.display(), names = ?g.names, "certificate removed");
                }
            }
        }
        dirty
    }

    /// Every pair's last good certificate, in a stable order (by file), so that ties between
    /// certificates resolve the same way every time.
    fn good_certs(&self) -> Vec<Arc<LoadedCert>> {
        let mut certs: Vec<Arc<LoadedCert>> = self
            .certs
            .values()
            .filter_map(|w| w.good().cloned())
            .collect();
        certs.sort_by(|a, b| a.cert_file.as_os_str().cmp(b.cert_file.as_os_str()));
        certs
    }

    /// The certificate map from every last-good pair, plus the development cert when asked.
    pub(super) fn assemble(
        &mut self,
        config: &Config,
        tls: &TlsShared,
    ) -> Result<Arc<CertStore>, LoadError> {
        let mut default = config.tls.default_cert.clone();
        if config.tls.self_signed {
            let mut certs = self.good_certs();
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
            self.standing.expired(store.certs().iter());
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
    pub(super) fn assemble_from_files(
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
                    .filter_map(|w| w.good().map(key))
                    .collect();
                let had: FastSet<usize> = prev.certs().iter().map(key).collect();
                let gone: FastSet<usize> = had.difference(&good).copied().collect();
                let came: Vec<Arc<LoadedCert>> = self
                    .certs
                    .values()
                    .filter_map(|w| w.good().cloned())
                    .filter(|c| !had.contains(&key(c)))
                    .collect();
                let store = prev.updated(&gone, came.clone());
                store.log_choices_of(came.iter());
                self.standing.expired(came.iter());
                store
            }
            None => {
                let store = CertStore::new(self.good_certs());
                store.log_choices();
                self.standing.expired(store.certs().iter());
                store
            }
        };
        // "localhost" stands for a `*` route, which needs no particular certificate.
        let mut uncovered = crate::tls::uncovered_route_hosts(&store, &config.routes);
        uncovered.retain(|h| h != "localhost");
        self.standing.uncovered(uncovered);
        if let Some(name) = default {
            store
                .set_default(&name)
                .map_err(|e| LoadError::Certs(vec![e]))?;
        }
        Ok(Arc::new(store))
    }

    /// History events for the certificates a publish added, replaced or removed.
    pub(super) fn cert_events(&mut self, old: Option<&CertStore>, new: &CertStore) {
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
}
