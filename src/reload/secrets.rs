//! Small secret files the poller watches whole (the admin token, the session-ticket keys): read
//! until two reads agree, refused when other users could read or write them, the last good value
//! kept when a new one does not load, and installed only when a poll commits.
//!
//! Owns: `Secrets` (one `Watched` value per secret file any config in play names, and the values
//! installed). A candidate config is planned against the files it names without installing
//! anything; `missing` is its gate (a config that asks for a secret limen cannot load is refused
//! whole, never applied without its guard); `install` is the commit. Must not touch: what the
//! secrets protect beyond handing them over (the admin listener checks the token, the ticketer
//! uses the keys).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::watched::{hash_bytes, permission_problem, read_stable, world_readable};
use super::watched::{Fingerprint, Refresh, StatFn, Watched};
use crate::config::Config;
use crate::tls::TlsShared;

/// Secrets are short: a token, a few keys.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The secret files a config may name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Kind {
    /// `listen.admin_token_file`: others may not even read it.
    AdminToken,
    /// `tls.ticket_keys`: others reading it is warned about.
    TicketKeys,
}

const KINDS: [Kind; 2] = [Kind::AdminToken, Kind::TicketKeys];

impl Kind {
    /// The metric's `kind` label.
    fn label(self) -> &'static str {
        match self {
            Kind::AdminToken => "admin_token",
            Kind::TicketKeys => "ticket_keys",
        }
    }

    /// The config key, as a user writes it.
    fn key(self) -> &'static str {
        match self {
            Kind::AdminToken => "listen.admin_token_file",
            Kind::TicketKeys => "tls.ticket_keys",
        }
    }

    fn path(self, config: &Config) -> Option<&Path> {
        match self {
            Kind::AdminToken => config.listen.admin_token_file.as_deref(),
            Kind::TicketKeys => config.tls.ticket_keys.as_deref(),
        }
    }

    fn check(self, bytes: &[u8]) -> Result<(), String> {
        match self {
            Kind::AdminToken => Ok(()),
            Kind::TicketKeys => crate::tickets::TicketKeys::parse(bytes).map(|_| ()),
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::AdminToken => 0,
            Kind::TicketKeys => 1,
        }
    }
}

/// One secret file and its last good contents (surrounding whitespace trimmed).
#[derive(Default)]
struct WatchedSecret {
    file: Watched<Vec<u8>>,
    /// The version of the file last warned about as world-readable: warned once, not per poll.
    warned: Option<Option<Fingerprint>>,
}

/// Every secret file the configs in play name, and what is installed.
#[derive(Default)]
pub(super) struct Secrets {
    files: HashMap<(Kind, PathBuf), WatchedSecret>,
    /// What the admin guard and the ticketer hold now, by `Kind::index`.
    installed: [Option<Arc<Vec<u8>>>; 2],
}

/// Where the commit hands the secrets over.
pub(super) struct Targets<'a> {
    pub admin_token: Option<&'a arc_swap::ArcSwapOption<Vec<u8>>>,
    pub tls: &'a TlsShared,
    pub metrics: Option<&'a crate::metrics::Metrics>,
}

impl Secrets {
    /// The admin token installed, if any.
    pub fn admin_token(&self) -> Option<Arc<Vec<u8>>> {
        self.installed[Kind::AdminToken.index()].clone()
    }

    /// Re-reads the secret files `configs` name (the config in force first, then a candidate)
    /// whose metadata (or, when `verify` asks, content) changed. Installs nothing. A file of the
    /// config in force that breaks keeps its last good value and is reported once (logged, and
    /// counted when `metrics` is given); a candidate's own broken file is reported by its refusal.
    pub fn refresh(
        &mut self,
        configs: &[&Config],
        stat: StatFn,
        verify: bool,
        metrics: Option<&crate::metrics::Metrics>,
    ) {
        let wanted: Vec<(Kind, &Path)> = configs
            .iter()
            .flat_map(|c| KINDS.iter().filter_map(|k| Some((*k, k.path(c)?))))
            .collect();
        self.files
            .retain(|(k, p), _| wanted.iter().any(|(wk, wp)| wk == k && *wp == p.as_path()));
        let in_force = |k: Kind, p: &Path| configs.first().and_then(|c| k.path(c)) == Some(p);
        for (kind, path) in wanted {
            let entry = self.files.entry((kind, path.to_path_buf())).or_default();
            let fps = [stat(path)];
            if !entry.file.due(&[path], &fps, verify) {
                continue;
            }
            if kind == Kind::TicketKeys && world_readable(path) && entry.warned != Some(fps[0]) {
                tracing::warn!(file = %path.display(), "the file is readable by every local user; run `chmod o-r` on it");
                entry.warned = Some(fps[0]);
            }
            let load = || {
                let v = read_secret(path, kind)?;
                kind.check(&v)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let hash = hash_bytes(&[&v]);
                Ok::<_, String>((v, hash))
            };
            let had = entry.file.good().is_some();
            if let Refresh::Failed { error, new: true } = entry.file.load_with(fps.to_vec(), load) {
                if in_force(kind, path) && had {
                    if let Some(m) = metrics {
                        m.reload(kind.label(), false);
                    }
                    tracing::error!("{error}; {} keeps the last good value", kind.key());
                }
            }
        }
    }

    /// Why `config` cannot be served: a secret it names that has no good value (a file that is
    /// missing, readable by others, empty or malformed). A config that asks for a guard limen
    /// cannot install is refused whole.
    pub fn missing(&self, config: &Config) -> Option<String> {
        KINDS.iter().find_map(|k| {
            let path = k.path(config)?;
            let w = self.files.get(&(*k, path.to_path_buf()));
            match w.and_then(|w| w.file.good()) {
                Some(_) => None,
                None => Some(format!(
                    "{}: {}",
                    k.key(),
                    w.and_then(|w| w.file.error())
                        .map_or_else(|| format!("{} did not load", path.display()), str::to_owned)
                )),
            }
        })
    }

    /// Whether committing `config` would change what is installed.
    pub fn pending(&self, config: &Config) -> bool {
        KINDS
            .iter()
            .any(|k| !same(&self.wanted(*k, config), &self.installed[k.index()]))
    }

    fn wanted(&self, kind: Kind, config: &Config) -> Option<Arc<Vec<u8>>> {
        let path = kind.path(config)?;
        self.files
            .get(&(kind, path.to_path_buf()))
            .and_then(|w| w.file.good().cloned())
    }

    /// The commit: hands over the secrets `config` names (none, when it names none: a removed
    /// `admin_token_file` turns the guard off, as the config says). Only what differs from what
    /// is installed is touched, logged and counted.
    pub fn install(&mut self, config: &Config, to: &Targets<'_>) {
        for kind in KINDS {
            let want = self.wanted(kind, config);
            let slot = &mut self.installed[kind.index()];
            if same(&want, slot) {
                continue;
            }
            let path = kind.path(config).map(|p| p.display().to_string());
            match kind {
                Kind::AdminToken => {
                    if let Some(a) = to.admin_token {
                        a.store(want.clone());
                    }
                    match &path {
                        Some(p) => tracing::info!(file = %p, "admin token loaded"),
                        None => tracing::warn!(
                            "listen.admin_token_file removed: the admin API needs no token now"
                        ),
                    }
                }
                Kind::TicketKeys => {
                    let keys = want
                        .as_deref()
                        .and_then(|v| crate::tickets::TicketKeys::parse(v).ok());
                    let n = keys.as_ref().map_or(0, |k| k.len());
                    to.tls.ticketer().set(keys.map(Arc::new));
                    match &path {
                        Some(p) => {
                            tracing::info!(file = %p, keys = n, "session-ticket keys loaded")
                        }
                        None => tracing::info!(
                            "tls.ticket_keys removed: session tickets use this process's own keys"
                        ),
                    }
                }
            }
            if let Some(m) = to.metrics {
                m.reload(kind.label(), true);
            }
            *slot = want;
        }
    }

    /// A short fingerprint of each secret in force, by its config key, for the typed diff and
    /// `/status.json`: tells that a secret changed, never what it is.
    pub fn fingerprints(&self) -> std::collections::BTreeMap<String, String> {
        KINDS
            .iter()
            .filter_map(|k| {
                let v = self.installed[k.index()].as_ref()?;
                Some((k.key().to_owned(), crate::config::diff::fingerprint(v)))
            })
            .collect()
    }
}

fn same(a: &Option<Arc<Vec<u8>>>, b: &Option<Arc<Vec<u8>>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

/// The file's contents once two reads in a row agree, trimmed; refused when another user could
/// write it, or (for the admin token) read it.
fn read_secret(path: &Path, kind: Kind) -> Result<Vec<u8>, String> {
    let shown = path.display();
    if let Some(why) = permission_problem(path) {
        return Err(why);
    }
    if kind == Kind::AdminToken && world_readable(path) {
        return Err(format!(
            "{shown}: refused: the file is readable by every local user; run `chmod o-r {shown}` (a Kubernetes Secret volume with defaultMode 0440 or 0400 is fine)"
        ));
    }
    let bytes = read_stable(
        || crate::config::read_regular(path, MAX_SECRET_FILE).map_err(|e| format!("{shown}: {e}")),
        || format!("{shown}: the file kept changing while being read; will retry at the next poll"),
    )?;
    let trimmed = bytes.trim_ascii().to_vec();
    if trimmed.is_empty() {
        return Err(format!("{shown}: the file is empty"));
    }
    Ok(trimmed)
}
