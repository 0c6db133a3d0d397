//! The files of `routes_dir`, each its own unit: re-listed at every poll, re-read when their
//! metadata (or, at a verify poll, their contents) change, and applied alone. A file that fails,
//! or that claims a route another file serves, keeps its own last good routes while every other
//! file's changes apply.
//!
//! Owns: `RouteFiles` (every file's last good routes, fingerprint, SHA-256 and current problem)
//! and the order the files' routes are served in. Must not touch: the main config file (the
//! reloader reads it), building route tables, publishing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{permission_problem, sha256_file, Fingerprint, StatFn};
use crate::config::{Claims, Config, ConfigError, RouteSpec};
use crate::state::FileStatus;

#[derive(Default)]
struct Unit {
    fp: Option<Fingerprint>,
    sha256: Option<String>,
    /// The version served; None until the file first loads.
    good: Option<Arc<Vec<RouteSpec>>>,
    /// The version served before `good` and its hash, for a rollback.
    previous: Option<Arc<Vec<RouteSpec>>>,
    previous_sha: Option<String>,
    /// The current problem, logged and counted once when it first appears.
    error: Option<String>,
    /// The fingerprint of a version that failed to parse: not read again until it changes.
    /// (A conflict is retried at every poll: the other file may let go of the route.)
    failed_fp: Option<Fingerprint>,
    /// Consecutive polls the listing did not show the file.
    gone_polls: u32,
    /// The SHA-256 refused by a rollback: the file is not applied again until it changes.
    refused: Option<String>,
}

/// A file read again that loaded: its path, fingerprint, routes and SHA-256.
type Candidate = (PathBuf, Option<Fingerprint>, Vec<RouteSpec>, Option<String>);

/// What one poll did to the files.
#[derive(Default)]
pub(super) struct Outcome {
    /// The served routes changed.
    pub changed: bool,
    /// Files applied (with their route-change summaries) and files removed.
    pub applied: Vec<(PathBuf, String)>,
    pub removed: Vec<PathBuf>,
    /// Files that failed this poll for a new reason, with the reason.
    pub failed: Vec<(PathBuf, String)>,
}

#[derive(Default)]
pub(super) struct RouteFiles {
    units: BTreeMap<PathBuf, Unit>,
    dir_error: Option<String>,
}

fn read(path: &Path) -> Result<(Vec<RouteSpec>, Option<String>), String> {
    if let Some(p) = permission_problem(path) {
        return Err(p);
    }
    let sha = sha256_file(path);
    let routes = crate::config::load_routes_file(path).map_err(|e| e.to_string())?;
    Ok((routes, sha))
}

impl RouteFiles {
    /// The strict first load (start, `--check`): every file must load, and no two files may
    /// claim the same route. `main` is the main file's config, whose routes claim first.
    pub fn load_all(&mut self, main: &Config, stat: StatFn) -> Result<(), ConfigError> {
        self.units.clear();
        let Some(dir) = &main.routes_dir else {
            return Ok(());
        };
        let files = crate::config::list_routes_dir(dir).map_err(|message| ConfigError::Rule {
            path: main.source.clone(),
            message,
        })?;
        for path in files {
            let fp = stat(&path);
            let (routes, sha256) = read(&path).map_err(ConfigError::Refused)?;
            self.units.insert(
                path,
                Unit {
                    fp,
                    sha256,
                    good: Some(Arc::new(routes)),
                    ..Unit::default()
                },
            );
        }
        let mut claims = Claims::default();
        claims.claim(&main.source, &main.routes)?;
        for (path, unit) in &self.units {
            claims.claim(path, unit.good.as_deref().map_or(&[], Vec::as_slice))?;
        }
        Ok(())
    }

    /// Every file's served routes, in file order, after the main file's.
    pub fn served(&self, main: &Arc<Config>) -> Arc<Config> {
        if self.units.is_empty() {
            return main.clone();
        }
        let mut c = (**main).clone();
        for u in self.units.values() {
            c.routes
                .extend(u.good.iter().flat_map(|g| g.iter().cloned()));
        }
        Arc::new(c)
    }

    /// Whether the main file's `routes` may be served beside the files': Err names the route
    /// one of them already serves.
    pub fn check_main(&self, main: &Config) -> Result<(), ConfigError> {
        let mut claims = Claims::default();
        for (path, unit) in &self.units {
            // Consistent among themselves: they were claimed one by one.
            let _ = claims.claim(path, unit.good.as_deref().map_or(&[], Vec::as_slice));
        }
        claims.claim(&main.source, &main.routes)
    }

    /// One poll of the directory: the listing, every changed file, the claims.
    pub fn refresh(&mut self, main: &Config, stat: StatFn, verify: bool) -> Outcome {
        let mut out = Outcome::default();
        let listed = match &main.routes_dir {
            None => Vec::new(),
            Some(dir) => match crate::config::list_routes_dir(dir) {
                Ok(v) => {
                    if self.dir_error.take().is_some() {
                        tracing::info!(dir = %dir.display(), "routes_dir can be listed again");
                    }
                    v
                }
                Err(msg) => {
                    // A folder that vanished (a remount, a volume swap) says nothing about its
                    // files: they stay until it lists them no more.
                    if self.dir_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}; its files keep their last good routes");
                        self.dir_error = Some(msg);
                    }
                    return out;
                }
            },
        };
        self.retire_unlisted(main, &listed, &mut out);
        // Files to read again: new, changed, or refused by a claim last time.
        let mut candidates: Vec<Candidate> = Vec::new();
        for path in listed {
            let fp = stat(&path);
            let unit = self.units.entry(path.clone()).or_default();
            unit.gone_polls = 0;
            let conflict = unit.error.is_some() && unit.failed_fp.is_none();
            let stale = unit.good.is_none() && unit.error.is_none()
                || conflict
                || (fp != unit.fp && (unit.failed_fp.is_none() || unit.failed_fp != fp))
                || (verify && sha256_file(&path) != unit.sha256 && unit.error.is_none());
            if !stale {
                continue;
            }
            match read(&path) {
                Ok((routes, sha)) => {
                    if unit.refused.is_some() && unit.refused == sha {
                        // Rolled back: the same content is not applied again.
                        unit.fp = fp;
                        continue;
                    }
                    if unit.good.as_deref() == Some(&routes) && unit.error.is_none() {
                        // Touched, or put back as it was.
                        unit.fp = fp;
                        unit.sha256 = sha;
                        continue;
                    }
                    candidates.push((path, fp, routes, sha));
                }
                Err(msg) => {
                    unit.failed_fp = fp;
                    if unit.error.as_deref() != Some(msg.as_str()) {
                        report(&path, unit, &msg);
                        out.failed.push((path.clone(), msg.clone()));
                        unit.error = Some(msg);
                    }
                }
            }
        }
        if candidates.is_empty() {
            return out;
        }
        let claimed: Vec<(PathBuf, Arc<Vec<RouteSpec>>)> = self
            .units
            .iter()
            .filter_map(|(p, u)| Some((p.clone(), u.good.clone()?)))
            .collect();
        let mut claims = Claims::default();
        let _ = claims.claim(&main.source, &main.routes);
        for (p, g) in &claimed {
            let _ = claims.claim(p, g);
        }
        for (path, fp, routes, sha) in &candidates {
            let Some(unit) = self.units.get_mut(path) else {
                continue;
            };
            match claims.claim(path, routes) {
                Ok(()) => {
                    let summary =
                        super::route_diff(unit.good.as_deref().map_or(&[], Vec::as_slice), routes);
                    tracing::info!(file = %path.display(), "routes file applied: {summary}");
                    if unit.error.take().is_some() {
                        tracing::info!(file = %path.display(), "routes file loads again");
                    }
                    unit.previous = unit.good.take();
                    unit.previous_sha = unit.sha256.take();
                    unit.good = Some(Arc::new(routes.clone()));
                    unit.fp = *fp;
                    unit.sha256.clone_from(sha);
                    unit.failed_fp = None;
                    unit.refused = None;
                    out.changed = true;
                    out.applied.push((path.clone(), summary));
                }
                Err(e) => {
                    let msg = e.to_string();
                    unit.failed_fp = None;
                    if unit.error.as_deref() != Some(msg.as_str()) {
                        report(path, unit, &msg);
                        out.failed.push((path.clone(), msg.clone()));
                        unit.error = Some(msg);
                    }
                }
            }
        }
        out
    }

    /// Files the listing no longer shows: gone for two polls means removed on purpose (a
    /// deletion may be the first half of a replacement); all at once when the config stopped
    /// naming their folder.
    fn retire_unlisted(&mut self, main: &Config, listed: &[PathBuf], out: &mut Outcome) {
        let dir = main.routes_dir.as_deref();
        let mut removed = Vec::new();
        for (path, unit) in &mut self.units {
            if listed.binary_search(path).is_ok() {
                continue;
            }
            unit.gone_polls += 1;
            if dir.is_none_or(|d| !path.starts_with(d)) || unit.gone_polls >= 2 {
                removed.push(path.clone());
            } else {
                tracing::warn!(file = %path.display(), "routes file gone; still serving its routes until it has been gone for two polls");
            }
        }
        for path in removed {
            if let Some(u) = self.units.remove(&path) {
                if u.good.is_some_and(|g| !g.is_empty()) {
                    out.changed = true;
                }
                tracing::info!(file = %path.display(), "routes file removed; its routes are no longer served");
                out.removed.push(path);
            }
        }
    }

    /// Puts back the version served before the last change of `path`, and refuses its current
    /// content until the file changes. True when something was put back.
    pub fn roll_back(&mut self, path: &Path) -> bool {
        let Some(unit) = self.units.get_mut(path) else {
            return false;
        };
        let Some(prev) = unit.previous.take() else {
            return false;
        };
        unit.refused = std::mem::replace(&mut unit.sha256, unit.previous_sha.take());
        unit.good = Some(prev);
        true
    }

    /// Each file's state, for the status page and metrics.
    pub fn statuses(&self) -> Vec<FileStatus> {
        self.units
            .iter()
            .map(|(p, u)| FileStatus {
                file: p.clone(),
                sha256: u.good.as_ref().and(u.sha256.clone()),
                error: u.error.clone(),
                pending: u.error.is_some() || u.refused.is_some(),
                routes: u.good.as_ref().map_or(0, |g| g.len()),
            })
            .collect()
    }
}

fn report(path: &Path, unit: &Unit, msg: &str) {
    if unit.good.is_some() {
        tracing::error!(file = %path.display(), "routes file reload failed, its previous routes stay in force: {msg}");
    } else {
        tracing::error!(file = %path.display(), "routes file not loaded: {msg}");
    }
}
