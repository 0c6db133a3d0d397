//! The files of `routes_dir`, each its own unit: re-listed at every poll, re-read when their
//! metadata (or, at a verify poll, their contents) change, and applied alone. A file that fails,
//! or that claims a route another file serves, keeps its own last good routes while every other
//! file's changes apply.
//!
//! Owns: `RouteFiles` (every file's last good routes, fingerprint, SHA-256 and current problem)
//! and the order the files' routes are served in. Must not touch: the main config file (the
//! reloader reads it), building route tables, publishing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::watched::{read_config_text, Watched};
use super::{FastMap, Fingerprint, StatFn};
use crate::config::{diff, Claims, Config, ConfigError, RouteSpec};
use crate::state::FileStatus;

#[derive(Default, Clone)]
struct Unit {
    /// The file: its fingerprint, the version served (None until it first loads), the current
    /// problem (logged and counted once) and, for a version that failed to parse, not reading it
    /// again until it changes (a conflict is retried at every poll: the other file may let go of
    /// the route).
    file: Watched<Vec<RouteSpec>>,
    /// SHA-256 of the version served, what replicas compare.
    sha256: Option<String>,
    /// The version served before the last one and its SHA-256, for a rollback.
    previous: Option<Arc<Vec<RouteSpec>>>,
    previous_sha: Option<String>,
    /// Consecutive polls the listing did not show the file.
    gone_polls: u32,
    /// The SHA-256 refused by a rollback: the file is not applied again until it changes.
    refused: Option<String>,
}

/// A file read again that loaded: its path, fingerprint, routes and the SHA-256 and hash of the
/// text they came from.
type Candidate = (PathBuf, Option<Fingerprint>, Vec<RouteSpec>, (String, u64));

/// What `revert` did.
pub(super) struct Reverted {
    /// Files newly marked failed, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// A file was blamed (newly or again).
    pub blamed: bool,
    /// A file was put back unblamed: its change can go out without the culprits.
    pub others: bool,
}

/// What one poll did to the files.
#[derive(Default)]
pub(super) struct Outcome {
    /// The served routes changed.
    pub changed: bool,
    /// Files applied (with their route-change summaries) and files removed.
    pub applied: Vec<(PathBuf, String)>,
    pub removed: Vec<PathBuf>,
    /// Files no longer pending without a new version applied (a rolled-back file put back as it
    /// is served).
    pub recovered: Vec<PathBuf>,
    /// Files that failed this poll for a new reason, with the reason.
    pub failed: Vec<(PathBuf, String)>,
}

#[derive(Default)]
pub(super) struct RouteFiles {
    /// Hashed, not ordered: `Path`'s ordering walks components, which over 1,000 files costs a
    /// poll more than its stat calls; the served order is sorted when it is built.
    units: FastMap<PathBuf, Unit>,
    dir_error: Option<String>,
    /// The state of every file the last refresh changed, as published: put back by `revert`
    /// when the snapshot built from it could not be published.
    /// With the fingerprint of the version applied (None: the file was removed).
    undo: Vec<(PathBuf, Option<Unit>, Option<Option<Fingerprint>>)>,
    /// Files refused for a file they name that did not load (a users file, a CA bundle), not
    /// for their own content: read again at the next poll (`rearm`), so that file appearing is
    /// enough; not within the same poll, whose retry goes out without them.
    waiting: Vec<PathBuf>,
}

/// Paths in byte order: stable, and much cheaper than `Path`'s component-wise order.
fn by_bytes(a: &Path, b: &Path) -> std::cmp::Ordering {
    a.as_os_str().cmp(b.as_os_str())
}

/// A file's routes and the SHA-256 of the very text they were parsed from, read once two reads
/// agree.
fn read(path: &Path) -> Result<(Vec<RouteSpec>, (String, u64)), String> {
    if let Some(refused) = crate::config::link_out_of_folder(path) {
        return Err(refused);
    }
    let t = read_config_text(path).map_err(|e| e.to_string())?;
    let routes = crate::config::parse_routes_file(&t.text, path).map_err(|e| e.to_string())?;
    Ok((routes, (t.sha256, t.hash)))
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
            let (routes, (sha256, hash)) = read(&path).map_err(ConfigError::Refused)?;
            let mut unit = Unit {
                sha256: Some(sha256),
                ..Unit::default()
            };
            unit.file.accept(vec![fp], hash, Arc::new(routes));
            self.units.insert(path, unit);
        }
        let mut claims = Claims::default();
        claims.claim(&main.source, &main.routes)?;
        let mut files: Vec<(&PathBuf, &Unit)> = self.units.iter().collect();
        files.sort_by(|a, b| by_bytes(a.0, b.0));
        for (path, unit) in files {
            claims.claim(path, unit.file.good().map_or(&[], |g| g.as_slice()))?;
        }
        Ok(())
    }

    /// Every file's served routes, in file order, after the main file's.
    pub fn served(&self, main: &Arc<Config>) -> Arc<Config> {
        if self.units.is_empty() {
            return main.clone();
        }
        let mut c = (**main).clone();
        let mut files: Vec<(&PathBuf, &Unit)> = self.units.iter().collect();
        files.sort_by(|a, b| by_bytes(a.0, b.0));
        for (_, u) in files {
            c.routes
                .extend(u.file.good().iter().flat_map(|g| g.iter().cloned()));
        }
        Arc::new(c)
    }

    /// Whether the main file's `routes` may be served beside the files': Err names the route
    /// one of them already serves.
    pub fn check_main(&self, main: &Config) -> Result<(), ConfigError> {
        let mut claims = Claims::default();
        for (path, unit) in &self.units {
            // Consistent among themselves: they were claimed one by one.
            let _ = claims.claim(path, unit.file.good().map_or(&[], |g| g.as_slice()));
        }
        claims.claim(&main.source, &main.routes)
    }

    /// One poll of the directory: the listing, every changed file, the claims.
    pub fn refresh(&mut self, main: &Config, stat: StatFn, verify: bool) -> Outcome {
        let mut out = Outcome::default();
        self.undo.clear();
        let Some(listed) = self.list(main) else {
            return out;
        };
        self.retire_unlisted(main, &listed, &mut out);
        let candidates = self.read_changed(listed, stat, verify, &mut out);
        if !candidates.is_empty() {
            self.claim(main, candidates, &mut out);
        }
        out
    }

    /// The files `routes_dir` lists now. None: it cannot be listed (a folder that vanished in a
    /// remount or a volume swap says nothing about its files: they stay until it lists them no
    /// more).
    fn list(&mut self, main: &Config) -> Option<Vec<PathBuf>> {
        let Some(dir) = &main.routes_dir else {
            return Some(Vec::new());
        };
        match crate::config::list_routes_dir(dir) {
            Ok(v) => {
                if self.dir_error.take().is_some() {
                    tracing::info!(dir = %dir.display(), "routes_dir can be listed again");
                }
                Some(v)
            }
            Err(msg) => {
                if self.dir_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("{msg}; its files keep their last good routes");
                    self.dir_error = Some(msg);
                }
                None
            }
        }
    }

    /// Reads the files that are new, changed, or were refused by a claim last time; returns
    /// those whose routes differ from the ones served. Parse failures are recorded in `out`.
    fn read_changed(
        &mut self,
        listed: Vec<PathBuf>,
        stat: StatFn,
        verify: bool,
        out: &mut Outcome,
    ) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = Vec::new();
        for path in listed {
            let fp = stat(&path);
            let unit = self.units.entry(path.clone()).or_default();
            unit.gone_polls = 0;
            // A conflict is tried at every poll (the other file may let go of the route); any
            // other failure when the file changes, or at a verify poll.
            if !unit.file.due(&[&path], &[fp], verify) {
                continue;
            }
            match read(&path) {
                Ok((routes, (sha, hash))) => {
                    if unit.refused.as_ref() == Some(&sha) {
                        // Rolled back: the same content is not applied again.
                        unit.file.skip(vec![fp], hash);
                        continue;
                    }
                    // Other content: the refusal has done its work.
                    if unit.refused.take().is_some() {
                        out.recovered.push(path.clone());
                    }
                    if unit.file.good().map(|g| g.as_slice()) == Some(routes.as_slice())
                        && unit.file.error().is_none()
                    {
                        // Touched, or put back as it was.
                        unit.file.touch(vec![fp], hash);
                        unit.sha256 = Some(sha);
                        continue;
                    }
                    candidates.push((path, fp, routes, (sha, hash)));
                }
                Err(msg) => {
                    if unit.file.fail(Some(vec![fp]), msg.clone()) {
                        report(&path, unit, &msg);
                        out.failed.push((path.clone(), msg));
                    }
                }
            }
        }
        candidates
    }

    /// Applies each candidate whose routes claim nothing the main file or another file holds
    /// (the previous state kept in `undo`); a conflict is recorded and retried at every poll.
    fn claim(&mut self, main: &Config, candidates: Vec<Candidate>, out: &mut Outcome) {
        let claimed: Vec<(PathBuf, Arc<Vec<RouteSpec>>)> = self
            .units
            .iter()
            .filter_map(|(p, u)| Some((p.clone(), u.file.good()?.clone())))
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
            if let Err(e) = claims.claim(path, routes) {
                let msg = e.to_string();
                if unit.file.fail(None, msg.clone()) {
                    report(path, unit, &msg);
                    out.failed.push((path.clone(), msg));
                }
                continue;
            }
            self.undo
                .push((path.clone(), Some(unit.clone()), Some(*fp)));
            let base = path.parent().unwrap_or(Path::new(""));
            let summary = diff::summary(&diff::diff(
                &diff::View::from_routes(unit.file.good().map_or(&[], |g| g.as_slice()), base),
                &diff::View::from_routes(routes, base),
            ));
            tracing::info!(file = %path.display(), "routes file applied: {summary}");
            if unit.file.error().is_some() {
                tracing::info!(file = %path.display(), "routes file loads again");
            }
            unit.previous = unit.file.good().cloned();
            unit.previous_sha = unit.sha256.take();
            unit.file.accept(vec![*fp], sha.1, Arc::new(routes.clone()));
            unit.sha256 = Some(sha.0.clone());
            unit.refused = None;
            out.changed = true;
            out.applied.push((path.clone(), summary));
        }
    }

    /// Files the listing no longer shows: gone for two polls means removed on purpose (a
    /// deletion may be the first half of a replacement); all at once when the config stopped
    /// naming their folder.
    fn retire_unlisted(&mut self, main: &Config, listed: &[PathBuf], out: &mut Outcome) {
        let dir = main.routes_dir.as_deref();
        let listed: std::collections::HashSet<
            &PathBuf,
            std::hash::BuildHasherDefault<super::PathHasher>,
        > = listed.iter().collect();
        let mut removed = Vec::new();
        for (path, unit) in &mut self.units {
            if listed.contains(path) {
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
                // Even a file that served nothing: its series and status entry must go, which
                // the publish does.
                out.changed = true;
                self.undo.push((path.clone(), Some(u), None));
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
        // A file that was new has nothing before it: its routes go.
        let prev = unit.previous.take().unwrap_or_default();
        unit.refused = std::mem::replace(&mut unit.sha256, unit.previous_sha.take());
        unit.file.set_good(Some(prev));
        true
    }

    /// The refresh's changes were published: nothing to put back any more.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// The snapshot built from the last refresh could not be published: every file it changed
    /// gets its published state back, and is read again at the next poll. The applied files
    /// `culprit` names are marked failed with `why` instead (read again when they change, or
    /// at a verify poll). Returns those newly failed, whether any file was blamed, and whether
    /// a file other than a culprit was put back.
    pub fn revert(
        &mut self,
        why: &str,
        culprit: impl Fn(&Path) -> bool,
        each_poll: bool,
    ) -> Reverted {
        let blame = Some(why);
        let mut failed = Vec::new();
        let (mut others, mut blamed_any) = (false, false);
        for (path, prior, fp) in std::mem::take(&mut self.undo).into_iter().rev() {
            let Some(mut unit) = prior else {
                continue;
            };
            let blamed = fp.is_some() && culprit(&path);
            others |= !blamed;
            blamed_any |= blamed;
            if let (Some(msg), Some(fp), true) = (blame, fp, blamed) {
                if each_poll {
                    self.waiting.push(path.clone());
                }
                if unit.file.fail(Some(vec![fp]), msg.to_string()) {
                    report(&path, &unit, msg);
                    failed.push((path.clone(), msg.to_string()));
                }
            }
            self.units.insert(path, unit);
        }
        Reverted {
            failed,
            blamed: blamed_any,
            others,
        }
    }

    /// Makes the files `revert` left waiting on a file they name due again: called at the start
    /// of a poll.
    pub fn rearm(&mut self) {
        for path in std::mem::take(&mut self.waiting) {
            if let Some(unit) = self.units.get_mut(&path) {
                if let Some(msg) = unit.file.error().map(str::to_owned) {
                    // The same message: not reported again.
                    unit.file.fail(None, msg);
                }
            }
        }
    }

    /// Each file's state, for the status page and metrics.
    pub fn statuses(&self) -> Vec<FileStatus> {
        let mut files: Vec<(&PathBuf, &Unit)> = self.units.iter().collect();
        files.sort_by(|a, b| by_bytes(a.0, b.0));
        files
            .into_iter()
            .map(|(p, u)| FileStatus {
                file: p.clone(),
                sha256: u.file.good().and(u.sha256.clone()),
                error: u.file.error().map(str::to_owned),
                pending: u.file.error().is_some() || u.refused.is_some(),
                routes: u.file.good().map_or(0, |g| g.len()),
            })
            .collect()
    }
}

fn report(path: &Path, unit: &Unit, msg: &str) {
    if unit.file.good().is_some() {
        tracing::error!(file = %path.display(), "routes file reload failed, its previous routes stay in force: {msg}");
    } else {
        tracing::error!(file = %path.display(), "routes file not loaded: {msg}");
    }
}
