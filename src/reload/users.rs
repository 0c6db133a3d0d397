//! The `auth.basic.users_file` of each route: watched like a secret (permissions checked, read
//! until two reads agree, the last good kept when a new version does not load), and handed to
//! the route table that is built next.
//!
//! Owns: reading and parsing users files, and saying which config cannot be served for want of
//! one. Must not touch: checking credentials (`crate::auth`), the route table (built from
//! `users_for` when a poll commits).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::watched::{hash_bytes, permission_problem, read_stable, world_readable};
use super::watched::{Fingerprint, Refresh, Watched};
use super::Reloader;
use crate::auth::Users;
use crate::config::{Auth, Config};

/// Loaded users files by path, as route tables are built from them.
pub type UsersFiles = HashMap<PathBuf, Arc<Users>>;

/// A users file is a few lines per user.
const MAX_USERS_FILE: u64 = 1024 * 1024;

/// One users file under watch.
#[derive(Default)]
pub(super) struct WatchedUsers {
    file: Watched<Users>,
    /// The version last warned about as world-readable: once, not per poll.
    warned: Option<Option<Fingerprint>>,
}

/// The users files `config`'s routes name.
fn users_paths(config: &Config) -> impl Iterator<Item = &Path> {
    config.routes.iter().filter_map(|r| match &r.auth {
        Some(Auth::Basic(b)) => Some(b.users_file.as_path()),
        _ => None,
    })
}

impl Reloader {
    /// Re-reads the users files `configs` name (the config in force first, then a candidate)
    /// whose metadata (or, when `verify` asks, content) changed. A file of the config in force
    /// that breaks keeps its last good users, reported once (logged and counted); a candidate's
    /// own broken file is reported by its refusal.
    pub(super) fn refresh_users(
        &mut self,
        configs: &[&Config],
        verify: bool,
        metrics: Option<&crate::metrics::Metrics>,
    ) {
        let wanted: HashSet<&Path> = configs.iter().flat_map(|c| users_paths(c)).collect();
        let in_force: HashSet<&Path> = configs
            .first()
            .map(|c| users_paths(c).collect())
            .unwrap_or_default();
        self.users.retain(|p, _| wanted.contains(p.as_path()));
        for path in wanted {
            let entry = self.users.entry(path.to_path_buf()).or_default();
            let fps = [(self.stat)(path)];
            if !entry.file.due(&[path], &fps, verify) {
                continue;
            }
            if world_readable(path) && entry.warned != Some(fps[0]) {
                tracing::warn!(file = %path.display(), "the users file is readable by every local user, who could test passwords against its hashes offline; run `chmod o-r` on it");
                entry.warned = Some(fps[0]);
            }
            let had = entry.file.good().is_some();
            match entry.file.load_with(fps.to_vec(), || read_users(path)) {
                Refresh::Failed { error, new: true } if had && in_force.contains(path) => {
                    if let Some(m) = metrics {
                        m.reload("users_file", false);
                    }
                    tracing::error!("{error}; the route keeps the last good users");
                }
                Refresh::Loaded { .. } if had => {
                    if let Some(m) = metrics {
                        m.reload("users_file", true);
                    }
                    tracing::info!(file = %path.display(), "users file reloaded");
                }
                _ => {}
            }
        }
    }

    /// Why `config` cannot be served: a users file it names that has no good version. A route
    /// that asks for a password check limen cannot make is never served without it.
    pub(super) fn missing_users(&self, config: &Config) -> Option<String> {
        users_paths(config).find_map(|p| {
            let w = self.users.get(p);
            if w.is_some_and(|w| w.file.good().is_some()) {
                return None;
            }
            Some(
                w.and_then(|w| w.file.error())
                    .map_or_else(|| format!("{}: did not load", p.display()), str::to_owned),
            )
        })
    }

    /// The routes_dir files (by name) of the routes whose users file did not load: they take the
    /// blame, and the other files' changes go out without them.
    pub(super) fn files_without_users(&self, config: &Config) -> Vec<std::ffi::OsString> {
        config
            .routes
            .iter()
            .filter(|r| match &r.auth {
                Some(Auth::Basic(b)) => self
                    .users
                    .get(&b.users_file)
                    .is_none_or(|w| w.file.good().is_none()),
                _ => false,
            })
            .filter_map(|r| r.unit.as_deref().map(std::ffi::OsString::from))
            .collect()
    }

    /// The users files `config`'s routes use, loaded.
    pub(super) fn users_for(&self, config: &Config) -> UsersFiles {
        users_paths(config)
            .filter_map(|p| Some((p.to_path_buf(), self.users.get(p)?.file.good()?.clone())))
            .collect()
    }
}

/// The file's users once two reads agree; refused when another user could write it.
fn read_users(path: &Path) -> Result<(Users, u64), String> {
    let shown = path.display();
    if let Some(why) = permission_problem(path) {
        return Err(why);
    }
    let bytes = read_stable(
        || crate::config::read_regular(path, MAX_USERS_FILE).map_err(|e| format!("{shown}: {e}")),
        || format!("{shown}: the file kept changing while being read; will retry at the next poll"),
    )?;
    let users = Users::parse(&bytes).map_err(|e| format!("{shown}: {e}"))?;
    Ok((users, hash_bytes(&[&bytes])))
}
