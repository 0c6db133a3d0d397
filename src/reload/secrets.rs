//! Small secret files the poller watches whole (the admin token): read until two reads agree,
//! refused when other users could read or write them, the last good value kept when a new one
//! does not load.
//!
//! Owns: `WatchedSecret`. Must not touch: what the secret protects (the admin listener checks it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{hash_files, permission_problem, world_readable, Fingerprint, StatFn};

/// Secrets are short: a token, a few keys.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// What to do about a secret file every local user can read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum OthersMayRead {
    Refuse,
    Warn,
}

/// One watched secret file and its last good contents (surrounding whitespace trimmed).
#[derive(Default)]
pub(super) struct WatchedSecret {
    fp: Option<Fingerprint>,
    hash: Option<u64>,
    pub value: Option<Arc<Vec<u8>>>,
    error: Option<String>,
    /// The version of the file last warned about as world-readable: warned once, not per poll.
    warned: Option<Option<Fingerprint>>,
}

/// What a refresh found.
pub(super) enum Refresh {
    Unchanged,
    /// New contents loaded.
    Loaded,
    /// A new problem (logged by the caller once; the last good value stays).
    Failed(String),
}

impl WatchedSecret {
    /// Re-reads `path` when its metadata changed (or its hash, when `verify` asks).
    /// `check` validates the contents: what it refuses is a failure like a missing file.
    pub fn refresh(
        &mut self,
        path: &Path,
        stat: StatFn,
        verify: bool,
        readable: OthersMayRead,
        check: &dyn Fn(&[u8]) -> Result<(), String>,
    ) -> Refresh {
        let fp = stat(path);
        let stale = self.value.is_none()
            || self.error.is_some()
            || fp != self.fp
            || (verify && hash_files(&[path]) != self.hash);
        if !stale {
            return Refresh::Unchanged;
        }
        if readable == OthersMayRead::Warn && world_readable(path) && self.warned != Some(fp) {
            tracing::warn!(file = %path.display(), "the file is readable by every local user; run `chmod o-r` on it");
            self.warned = Some(fp);
        }
        let read = read_secret_stable(path, readable).and_then(|v| {
            check(&v).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(v)
        });
        match read {
            Ok(v) => {
                let changed = self.value.as_deref() != Some(&v);
                self.value = Some(Arc::new(v));
                self.fp = fp;
                self.hash = hash_files(&[path]);
                let recovered = self.error.take().is_some();
                if changed || recovered {
                    Refresh::Loaded
                } else {
                    Refresh::Unchanged
                }
            }
            Err(msg) => {
                if self.error.as_deref() == Some(msg.as_str()) {
                    return Refresh::Unchanged;
                }
                self.error = Some(msg.clone());
                Refresh::Failed(msg)
            }
        }
    }
}

/// The file's contents once two reads in a row agree, trimmed; refused when another user could
/// read or write it.
fn read_secret_stable(path: &Path, readable: OthersMayRead) -> Result<Vec<u8>, String> {
    let shown = path.display();
    if let Some(why) = permission_problem(path) {
        return Err(why);
    }
    if world_readable(path) && readable == OthersMayRead::Refuse {
        return Err(format!(
            "{shown}: refused: the file is readable by every local user; run `chmod o-r {shown}` (a Kubernetes Secret volume with defaultMode 0440 or 0400 is fine)"
        ));
    }
    let read = |p: &PathBuf| {
        crate::config::read_regular(p, MAX_SECRET_FILE).map_err(|e| format!("{shown}: {e}"))
    };
    let path = path.to_path_buf();
    let mut prev = read(&path)?;
    for _ in 0..5 {
        let next = read(&path)?;
        if next == prev {
            let trimmed = prev.trim_ascii().to_vec();
            if trimmed.is_empty() {
                return Err(format!("{shown}: the file is empty"));
            }
            return Ok(trimmed);
        }
        prev = next;
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!(
        "{shown}: the file kept changing while being read; will retry at the next poll"
    ))
}
