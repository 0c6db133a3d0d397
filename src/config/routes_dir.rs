//! `routes_dir`: a folder of route files, each validated alone so that one broken file costs only
//! its own routes, and the claims that keep a host and path (or a route name) to one file.
//!
//! Owns: which entries of the folder are route files, a route file's schema (`routes:` only), and
//! the conflict rule between files. Must not touch: what a file kept from an earlier load (the
//! reloader decides which version of each file is served).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::build::{resolver, routes_from};
use super::files::{read_text, syntax_error};
use super::raw::RawRoute;
use super::{ConfigError, RouteSpec};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutesFile {
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

/// Reads and validates one file of `routes_dir`. An empty file (or one of comments only) holds no
/// routes: a ConfigMap key emptied on purpose is not an error.
pub fn load_routes_file(path: &Path) -> Result<Vec<RouteSpec>, ConfigError> {
    if let Some(message) = link_out_of_folder(path) {
        return Err(ConfigError::Refused(message));
    }
    parse_routes_file(&read_text(path)?, path)
}

/// Why a file of `routes_dir` is not read at all: it is a link whose target is outside the
/// folder. Whoever may add a file to the folder could otherwise have limen read any file limen
/// may read (its own TLS key), and a parse error would carry its bytes to the log and the status
/// page. A ConfigMap's links (`a.yaml -> ..data/a.yaml -> ..2024_x/a.yaml`) stay inside.
pub fn link_out_of_folder(path: &Path) -> Option<String> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return None;
    }
    let folder = path.parent().and_then(|d| std::fs::canonicalize(d).ok());
    let target = std::fs::canonicalize(path).ok();
    match (folder, target) {
        (Some(folder), Some(target)) if target.starts_with(&folder) => None,
        _ => Some(format!(
            "{}: a link to a file outside routes_dir: refused and not read (put the file itself in the folder, or link within it)",
            path.display()
        )),
    }
}

/// Validates the text of one file of `routes_dir`, as if read from `path`.
pub fn parse_routes_file(text: &str, path: &Path) -> Result<Vec<RouteSpec>, ConfigError> {
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        return Ok(Vec::new());
    }
    let raw: RawRoutesFile = serde_saphyr::from_str(text).map_err(|e| syntax_error(path, &e))?;
    let unit = path
        .file_name()
        .map(|n| Arc::<str>::from(n.to_string_lossy().as_ref()));
    routes_from(raw.routes, path, unit, &resolver(path))
}

/// The route files of `dir`, sorted: `*.yaml` and `*.yml` entries that are regular files once
/// symlinks are followed. Dot-files are left out, which also leaves out a ConfigMap's `..data`
/// and `..TIMESTAMP` entries; the keys' own links (`a.yaml -> ..data/a.yaml`) are what count.
pub fn list_routes_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "{}: cannot list routes_dir: {e}; check the path and that limen may read it",
            dir.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // A name with a control character would reach log lines, metric labels and the status
        // page as a route label's prefix: such a file is not a routes file.
        let printable = !name.chars().any(char::is_control);
        if !printable {
            warn_unprintable(&name);
        }
        let wanted = printable
            && !name.starts_with('.')
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
            && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
        if wanted {
            files.push(entry.path());
        }
    }
    // Byte order: stable, and cheaper than `Path`'s component-wise order.
    files.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    Ok(files)
}

/// Once per name (the folder is listed at every poll), escaped.
fn warn_unprintable(name: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if warned.iter().any(|w| w == name) || warned.len() >= 64 {
        return;
    }
    warned.push(name.to_owned());
    tracing::warn!(file = ?name, "a routes_dir file whose name holds a control character is ignored: rename it");
}

/// Which file serves each host and path, and each route name, across the main file and
/// `routes_dir`. Names label metrics, so they are claimed like paths.
#[derive(Default)]
pub struct Claims<'a> {
    routes: HashMap<(String, String), (&'a Path, &'a RouteSpec)>,
    names: HashMap<&'a str, (&'a Path, &'a RouteSpec)>,
}

impl<'a> Claims<'a> {
    /// Claims every route of `file`, or none of them: Err names the first route another file
    /// already holds, with both places.
    pub fn claim(&mut self, file: &'a Path, routes: &'a [RouteSpec]) -> Result<(), ConfigError> {
        let taken = |held: Option<&(&'a Path, &'a RouteSpec)>, r: &RouteSpec, what: String| {
            held.filter(|(f, _)| *f != file).map(|(f, o)| ConfigError::Invalid {
                path: file.to_path_buf(),
                line: r.line,
                column: r.column,
                message: format!(
                    "route {} ({} {}): {what} is already served by {}:{}:{}; a route belongs to one file, so this file is not applied: remove it from one of the two",
                    r.index,
                    r.host,
                    r.path,
                    f.display(),
                    o.line,
                    o.column
                ),
            })
        };
        for r in routes {
            // By host and path, whatever the match: a path's variants (a canary and its stable
            // route) live in one file, so no file can outrank another's route with a condition
            // that always holds, and routing never depends on how files sort.
            let key = (r.host.to_string(), r.path.clone());
            if let Some(e) = taken(self.routes.get(&key), r, "its host and path".into()) {
                return Err(e);
            }
            if let Some(name) = &r.name {
                if let Some(e) = taken(self.names.get(name.as_str()), r, format!("name {name:?}")) {
                    return Err(e);
                }
            }
        }
        for r in routes {
            self.routes
                .insert((r.host.to_string(), r.path.clone()), (file, r));
            if let Some(name) = &r.name {
                self.names.insert(name.as_str(), (file, r));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn only_yaml_files_not_dot_files_nor_folders_are_route_files() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "b.yml", "");
        write(d.path(), "a.yaml", "");
        write(d.path(), ".hidden.yaml", "");
        write(d.path(), "notes.txt", "");
        // Names that would forge a log line or a terminal's colours, were they route labels.
        write(d.path(), "forged\nERROR x.yaml", "");
        write(d.path(), "esc\u{1b}[31m.yaml", "");
        std::fs::create_dir(d.path().join("sub.yaml")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a.yaml"), d.path().join("link.yaml")).unwrap();
        std::os::unix::fs::symlink(d.path().join("gone"), d.path().join("dangling.yaml")).unwrap();
        let names: Vec<String> = list_routes_dir(d.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml", "link.yaml"]);
        assert!(list_routes_dir(&d.path().join("missing")).is_err());
    }

    #[test]
    fn a_route_file_holds_routes_only_and_names_its_lines() {
        let d = tempfile::tempdir().unwrap();
        let ok = write(
            d.path(),
            "a.yaml",
            "routes:\n  - host: a.test\n    respond: {body: a}\n",
        );
        let routes = load_routes_file(&ok).unwrap();
        assert_eq!(routes[0].unit.as_deref(), Some("a.yaml"));
        let empty = write(d.path(), "e.yaml", "# nothing yet\n\n");
        assert!(load_routes_file(&empty).unwrap().is_empty());
        let bad = write(d.path(), "b.yaml", "listen: {https: \"127.0.0.1:1\"}\n");
        let e = load_routes_file(&bad).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:1:", bad.display())), "{e}");
    }

    #[test]
    fn a_host_and_path_or_a_name_belongs_to_one_file() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "a.yaml",
            "routes:\n  - host: a.test\n    name: api\n    respond: {body: a}\n",
        );
        let b = write(
            d.path(),
            "b.yaml",
            "routes:\n  - host: b.test\n    respond: {body: b}\n  - host: a.test\n    respond: {body: b}\n",
        );
        let c = write(
            d.path(),
            "c.yaml",
            "routes:\n  - host: c.test\n    name: api\n    respond: {body: c}\n",
        );
        let (ra, rb, rc) = (
            load_routes_file(&a).unwrap(),
            load_routes_file(&b).unwrap(),
            load_routes_file(&c).unwrap(),
        );
        let mut claims = Claims::default();
        claims.claim(&a, &ra).unwrap();
        let e = claims.claim(&b, &rb).unwrap_err().to_string();
        assert!(e.contains(&b.display().to_string()) && e.contains(&a.display().to_string()));
        assert!(e.starts_with(&format!("{}:4:", b.display())), "{e}");
        let e = claims.claim(&c, &rc).unwrap_err().to_string();
        assert!(e.contains("name \"api\""), "{e}");
        // A rejected file claimed nothing: b.test is still free.
        let d2 = write(
            d.path(),
            "d.yaml",
            "routes:\n  - host: b.test\n    respond: {body: d}\n",
        );
        let rd = load_routes_file(&d2).unwrap();
        claims.claim(&d2, &rd).unwrap();
    }
}
