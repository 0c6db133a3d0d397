//! The `upstream_tls` blocks of https routes: each block's files (CA bundle, client pair) watched
//! as one `Watched` set, and the rustls client config last built from them.
//!
//! Owns: reading and building the blocks' client configs, and saying which routes cannot be served
//! for want of one. Must not touch: the upstream pools (the route table is built from
//! `tls_configs` when a poll commits).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::certs::unstable;
use super::watched::{hash_files, permission_problem, read_stable, Refresh, Watched};
use super::Reloader;
use crate::config::{Config, UpstreamScheme, UpstreamTls};
use crate::tls::{TlsError, TlsShared};

/// One `upstream_tls` block under watch: its files, and the client config last built from them.
pub(super) type WatchedUpstreamTls = Watched<Arc<rustls::ClientConfig>>;

/// The files an `upstream_tls` block names.
pub(super) fn upstream_tls_paths(settings: &UpstreamTls) -> Vec<&Path> {
    let mut v: Vec<&Path> = settings.ca.iter().map(PathBuf::as_path).collect();
    if let Some((c, k)) = &settings.client {
        v.push(c);
        v.push(k);
    }
    v
}

/// Reads an `upstream_tls` block's files until two reads in a row agree, as for a cert pair.
fn read_upstream_tls_stable(
    settings: &UpstreamTls,
) -> Result<crate::tls::UpstreamTlsFiles, TlsError> {
    if let Some(p) = upstream_tls_paths(settings)
        .into_iter()
        .find_map(|p| permission_problem(p).map(|why| (p, why)))
    {
        return Err(TlsError::Read {
            path: p.0.to_path_buf(),
            reason: p.1,
        });
    }
    let first = upstream_tls_paths(settings)
        .first()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    read_stable(
        || crate::tls::read_upstream_tls(settings),
        || unstable(&first),
    )
}
/// Every `upstream_tls` block `config` needs, with its route: a route's own when it has an
/// `https://` upstream, and its `auth.forward` block when the auth service is `https://`.
fn tls_blocks(config: &Config) -> impl Iterator<Item = (&crate::config::RouteSpec, &UpstreamTls)> {
    config.routes.iter().flat_map(|r| {
        let own = matches!(&r.action, crate::config::RouteAction::Proxy(urls)
            if urls.iter().any(|u| u.url.scheme == UpstreamScheme::Https))
        .then_some((r, &r.upstream_tls));
        let auth = match &r.auth {
            Some(crate::config::Auth::Forward(f)) if f.upstream.scheme == UpstreamScheme::Https => {
                Some((r, &f.upstream_tls))
            }
            _ => None,
        };
        own.into_iter().chain(auth)
    })
}

impl Reloader {
    /// Why `config` cannot be served for want of upstream TLS settings (a block of an https
    /// route whose files did not load), if it cannot.
    pub(super) fn missing_upstream_tls(&self, config: &Config) -> Option<String> {
        tls_blocks(config).find_map(|(r, block)| {
            let watched = self.upstream_tls.get(block);
            if watched.is_some_and(|w| w.good().is_some()) {
                return None;
            }
            // Why, naming the file: the operator's next step is that file.
            let why = watched.and_then(|w| w.error()).map_or_else(
                || {
                    let files: Vec<String> = block
                        .ca
                        .iter()
                        .chain(block.client.iter().flat_map(|(c, k)| [c, k]))
                        .map(|p| p.display().to_string())
                        .collect();
                    format!("not loaded yet ({})", files.join(", "))
                },
                str::to_owned,
            );
            Some(format!(
                "route {} ({} {}): its upstream_tls settings did not load: {why}",
                r.index, r.host, r.path
            ))
        })
    }

    /// The routes_dir files (by name) of the routes the last built config cannot serve for want
    /// of their upstream TLS settings.
    pub(super) fn unservable_files(&self, config: &Config) -> Vec<std::ffi::OsString> {
        tls_blocks(config)
            .filter(|(_, block)| {
                self.upstream_tls
                    .get(*block)
                    .is_none_or(|w| w.good().is_none())
            })
            .filter_map(|(r, _)| r.unit.as_deref().map(std::ffi::OsString::from))
            .collect()
    }

    /// The client configs of the blocks `config`'s https routes use that loaded.
    pub(super) fn upstream_tls_for(&self, config: &Config) -> crate::upstream::TlsConfigs {
        tls_blocks(config)
            .filter_map(|(_, block)| {
                let w = self.upstream_tls.get(block)?;
                Some((block.clone(), Arc::clone(&**w.good()?)))
            })
            .collect()
    }

    /// What a route table is built from besides the config: `registry`, the upstream TLS configs
    /// `tls`, and the rate limiters this reloader keeps across configs.
    pub(super) fn inputs<'a>(
        &'a self,
        registry: &'a crate::upstream::UpstreamRegistry,
        tls: &'a crate::upstream::TlsConfigs,
        users: &'a super::users::UsersFiles,
    ) -> crate::routing::Inputs<'a> {
        crate::routing::Inputs {
            registry,
            tls,
            limiters: &self.limiters,
            users,
        }
    }

    /// The client configs of the `upstream_tls` blocks in force.
    pub(super) fn tls_configs(&self) -> crate::upstream::TlsConfigs {
        self.upstream_tls
            .iter()
            .filter_map(|(k, w)| Some((k.clone(), Arc::clone(&**w.good()?))))
            .collect()
    }

    /// Re-reads the files of every `upstream_tls` block whose files changed (or whose contents
    /// changed, when `verify` asks for hashes), and builds its client config again. A block that
    /// fails keeps its last good config; each problem is logged once. The second value says
    /// whether a block the config to serve (the last of `configs`) uses changed: a block only a
    /// refused candidate names is kept warm, but rebuilds nothing.
    /// `configs`: the config in force and the candidate, so a candidate that fails later does not
    /// cost the blocks in force their warm state.
    pub(super) fn refresh_upstream_tls(
        &mut self,
        configs: &[&Config],
        tls: &TlsShared,
        verify: bool,
    ) -> (Vec<TlsError>, bool) {
        let blocks = |c: &'_ Config| -> Vec<UpstreamTls> {
            tls_blocks(c).map(|(_, block)| block.clone()).collect()
        };
        let serving: HashSet<UpstreamTls> = configs
            .last()
            .map(|c| blocks(c).into_iter().collect())
            .unwrap_or_default();
        let wanted: HashSet<UpstreamTls> = configs.iter().flat_map(|c| blocks(c)).collect();
        self.upstream_tls.retain(|k, _| wanted.contains(k));
        let (mut errors, mut changed) = (Vec::new(), false);
        for settings in &wanted {
            let files = upstream_tls_paths(settings);
            let entry = self.upstream_tls.entry(settings.clone()).or_default();
            let load = || {
                let files = read_upstream_tls_stable(settings)?;
                let cfg = crate::tls::upstream_client_config(
                    settings,
                    &files,
                    &tls.provider_for(settings.post_quantum),
                )?;
                Ok((cfg, hash_files(&upstream_tls_paths(settings)).unwrap_or(0)))
            };
            let had = entry.good().is_some();
            match entry.refresh(&files, self.stat, verify, load) {
                Refresh::Unchanged => {}
                Refresh::Loaded { recovered, .. } => {
                    if had {
                        tracing::info!(files = ?files, "upstream TLS settings reloaded");
                    }
                    if recovered {
                        tracing::info!(files = ?files, "upstream TLS settings load again");
                    }
                    changed |= serving.contains(settings);
                }
                Refresh::Failed { error, new } => {
                    if new {
                        if had {
                            tracing::error!(
                                "{error}; upstream connections keep the last good TLS settings"
                            );
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
