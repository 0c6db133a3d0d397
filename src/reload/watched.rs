//! One watched file (or set of files read together), whatever it holds: the metadata fingerprint
//! that says when to read again, the content hash of the periodic verify, reading until two reads
//! agree, the permission rules, the last good value and the current problem, reported once.
//!
//! Owns: `Watched<T>` and the file facts every watcher shares (fingerprints, hashes, permission
//! rules, stable reads). Each file type supplies only "read and parse these files into T" and says
//! what to log; must not touch: what the value is for (the snapshot, the TLS configs, the admin
//! guard), which the reloader installs when a poll commits.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What a file's metadata says about its contents. Any difference counts as a change: mtime can
/// move backwards (`cp -p`, `tar x`, `rsync -t`), two writes can share a second, and a symlink swap
/// changes the inode while everything else may look the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub size: u64,
    pub ino: u64,
    pub dev: u64,
}

/// How the poller reads metadata; tests inject one that hides changes.
pub type StatFn = fn(&Path) -> Option<Fingerprint>;

/// The fingerprint of the file `path` resolves to now (symlinks followed at every call).
pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        size: m.size(),
        ino: m.ino(),
        dev: m.dev(),
    })
}

pub(super) fn hash_bytes(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// SHA-256 of a config or routes file's content, lower-case hex: what replicas compare.
#[cfg(test)]
pub(super) fn sha256_file(path: &Path) -> Option<String> {
    let bytes = crate::config::read_regular(path, crate::config::MAX_CONFIG_BYTES).ok()?;
    Some(crate::tls::hex(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
    ))
}

pub(super) fn hash_files(paths: &[&Path]) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        crate::config::read_regular(p, crate::config::MAX_CONFIG_BYTES)
            .ok()?
            .hash(&mut h);
    }
    Some(h.finish())
}

fn own_uid() -> u32 {
    static UID: OnceLock<u32> = OnceLock::new();
    *UID.get_or_init(|| {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0)
    })
}

/// The draft's security rule: a file anyone could write, or that another (non-root) user owns,
/// could be used to hijack the proxy, so it is refused.
pub(super) fn permission_problem(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    if m.mode() & 0o002 != 0 {
        return Some(format!(
            "{}: refused: the file is world-writable, so any local user could change what limen serves; run `chmod o-w {}`",
            path.display(),
            path.display()
        ));
    }
    let uid = own_uid();
    if m.uid() != uid && m.uid() != 0 {
        return Some(format!(
            "{}: refused: the file is owned by uid {}, neither limen's user (uid {uid}) nor root; chown it to one of them",
            path.display(),
            m.uid()
        ));
    }
    None
}

pub(super) fn world_readable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o004 != 0)
}

/// `read` repeated until two reads in a row agree, so a file caught mid-write is never parsed as
/// whole. Bounded, like Envoy's retry on watched secrets; `unstable` makes the error when the
/// files never settle.
pub(super) fn read_stable<T: PartialEq, E>(
    read: impl Fn() -> Result<T, E>,
    unstable: impl FnOnce() -> E,
) -> Result<T, E> {
    let mut prev = read()?;
    for _ in 0..5 {
        let next = read()?;
        if next == prev {
            return Ok(next);
        }
        prev = next;
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(unstable())
}

/// A config or routes file as read once two reads agreed: its text, the SHA-256 replicas compare,
/// and the hash the verify pass compares. An editor that writes in place is never caught
/// half-way: a truncated YAML file can parse, and would serve half its routes.
pub(super) struct Text {
    pub text: String,
    pub sha256: String,
    pub hash: u64,
}

/// Reads a config or routes file whole and stable, refused when others could write it.
pub(super) fn read_config_text(path: &Path) -> Result<Text, crate::config::ConfigError> {
    use crate::config::ConfigError;
    if let Some(p) = permission_problem(path) {
        return Err(ConfigError::Refused(p));
    }
    let text = read_stable(
        || crate::config::read_text(path),
        || {
            ConfigError::Refused(format!(
                "{}: the file kept changing while being read; will retry at the next poll",
                path.display()
            ))
        },
    )?;
    let sha256 = crate::tls::hex(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref(),
    );
    let hash = hash_bytes(&[text.as_bytes()]);
    Ok(Text { text, sha256, hash })
}

/// What a refresh of a watched file found.
pub(super) enum Refresh<E> {
    /// Nothing to read, or the same content read again.
    Unchanged,
    /// A new value loaded. `recovered`: it had been failing.
    Loaded { recovered: bool },
    /// The files do not load; the last good value stays. `new`: a problem not reported before
    /// (the caller logs and counts it), so one failure is reported once however often it is read.
    Failed { error: E, new: bool },
}

/// One file, or a set of files read together (a certificate and its key, a CA bundle and a
/// client pair), with its last good parsed value.
///
/// Two ways to use it: `refresh` reads and keeps what loads (certificates, CA bundles, secrets:
/// their last good value is what is served or installed); or `due`, then the caller's own read and
/// gates, then `accept`, `touch` or `fail` (config files: their last good value is the version
/// published, so a version that parses but is refused later must not become it).
pub(super) struct Watched<T> {
    fps: Vec<Option<Fingerprint>>,
    hash: Option<u64>,
    good: Option<Arc<T>>,
    error: Option<String>,
    /// With `error`: the fingerprints of the version that failed on its own content, not read
    /// again until they change (or a verify pass). None: read again at every poll (a problem
    /// that may go away without the file changing, like a route another file holds).
    failed_at: Option<Vec<Option<Fingerprint>>>,
}

impl<T> Default for Watched<T> {
    fn default() -> Self {
        Watched {
            fps: Vec::new(),
            hash: None,
            good: None,
            error: None,
            failed_at: None,
        }
    }
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        Watched {
            fps: self.fps.clone(),
            hash: self.hash,
            good: self.good.clone(),
            error: self.error.clone(),
            failed_at: self.failed_at.clone(),
        }
    }
}

impl<T> Watched<T> {
    /// The last value that loaded; kept while newer versions fail.
    pub fn good(&self) -> Option<&Arc<T>> {
        self.good.as_ref()
    }

    /// The current problem, if the last read failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Sets the current problem without a read (a pair whose files are gone); true when it is new.
    /// The files are read again at every poll.
    pub fn note(&mut self, problem: String) -> bool {
        self.fail(None, problem)
    }

    /// Records a problem; true when it is new (to be logged and counted once). `at`: the
    /// fingerprints of a version that failed on its own content, not read again until they
    /// change; None: read again at every poll.
    pub fn fail(&mut self, at: Option<Vec<Option<Fingerprint>>>, problem: String) -> bool {
        let new = self.error.as_deref() != Some(problem.as_str());
        self.error = Some(problem);
        self.failed_at = at;
        new
    }

    /// Whether `paths` must be read again: never loaded, failing (at every poll, or once the
    /// version that failed changes), their metadata moved, or (when `verify` asks for the content
    /// safety net) their content hash moved.
    pub fn due(&self, paths: &[&Path], fps: &[Option<Fingerprint>], verify: bool) -> bool {
        if self.error.is_some() {
            return match &self.failed_at {
                None => true,
                Some(at) => at != fps || verify,
            };
        }
        self.good.is_none() || self.fps != fps || (verify && hash_files(paths) != self.hash)
    }

    /// A new version becomes the last good one (for config files: once it is applied).
    pub fn accept(&mut self, fps: Vec<Option<Fingerprint>>, hash: u64, value: Arc<T>) {
        self.fps = fps;
        self.hash = Some(hash);
        self.good = Some(value);
        self.error = None;
        self.failed_at = None;
    }

    /// The files were read again and hold the last good version (touched, or put back as they
    /// were): nothing to apply, and any problem is over. True when there was one.
    pub fn touch(&mut self, fps: Vec<Option<Fingerprint>>, hash: u64) -> bool {
        self.fps = fps;
        self.hash = Some(hash);
        self.failed_at = None;
        self.error.take().is_some()
    }

    /// The version read is not to be applied, nor read again until it changes (content a
    /// rollback refused), and there is no problem to report.
    pub fn skip(&mut self, fps: Vec<Option<Fingerprint>>, hash: u64) {
        self.fps = fps;
        self.hash = Some(hash);
    }

    /// Puts another value in force without a read (a rollback to the version before).
    pub fn set_good(&mut self, value: Option<Arc<T>>) {
        self.good = value;
    }

    /// Reads `paths` again when stale, through `load` (which reads until two reads agree, parses,
    /// and returns the value with the hash of the very bytes it parsed). The value changes only
    /// when it loads; a failure keeps the last good one.
    pub fn refresh<E: std::fmt::Display>(
        &mut self,
        paths: &[&Path],
        stat: StatFn,
        verify: bool,
        load: impl FnOnce() -> Result<(T, u64), E>,
    ) -> Refresh<E> {
        // Compared in place: a poll over 10,000 pairs must not allocate per pair to learn that
        // nothing changed. The files are stat'ed again only when something did.
        let same = self.good.is_some()
            && self.error.is_none()
            && self.fps.len() == paths.len()
            && paths.iter().zip(&self.fps).all(|(p, f)| stat(p) == *f);
        if same && !(verify && hash_files(paths) != self.hash) {
            return Refresh::Unchanged;
        }
        let fps: Vec<Option<Fingerprint>> = paths.iter().map(|p| stat(p)).collect();
        self.load_with(fps, load)
    }

    /// Reads again whatever the metadata says, recording `fps` as the version read.
    pub fn load_with<E: std::fmt::Display>(
        &mut self,
        fps: Vec<Option<Fingerprint>>,
        load: impl FnOnce() -> Result<(T, u64), E>,
    ) -> Refresh<E> {
        match load() {
            Ok((value, hash)) => {
                let same = self.hash == Some(hash) && self.good.is_some();
                let recovered = self.error.take().is_some();
                self.failed_at = None;
                self.fps = fps;
                self.hash = Some(hash);
                if same && !recovered {
                    // Touched, not changed: the value in force (and its identity) stays.
                    return Refresh::Unchanged;
                }
                self.good = Some(Arc::new(value));
                Refresh::Loaded { recovered }
            }
            Err(error) => {
                let new = self.fail(None, error.to_string());
                Refresh::Failed { error, new }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_last_good_value_and_is_new_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "one").unwrap();
        let mut w: Watched<String> = Watched::default();
        let load = |p: &Path| {
            let s = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
            if s.starts_with("bad") {
                return Err(format!("bad content {s}"));
            }
            let h = hash_bytes(&[s.as_bytes()]);
            Ok((s, h))
        };
        assert!(matches!(
            w.refresh(&[&p], fingerprint, false, || load(&p)),
            Refresh::Loaded { recovered: false }
        ));
        std::fs::write(&p, "bad1").unwrap();
        assert!(matches!(
            w.refresh(&[&p], fingerprint, true, || load(&p)),
            Refresh::Failed { new: true, .. }
        ));
        assert!(matches!(
            w.refresh(&[&p], fingerprint, true, || load(&p)),
            Refresh::Failed { new: false, .. }
        ));
        assert_eq!(w.good().map(|s| s.as_str()), Some("one"));
        std::fs::write(&p, "two").unwrap();
        assert!(matches!(
            w.refresh(&[&p], fingerprint, true, || load(&p)),
            Refresh::Loaded { recovered: true }
        ));
        assert_eq!(w.good().map(|s| s.as_str()), Some("two"));
        assert!(w.error().is_none());
    }

    /// The text, its SHA-256 and its hash all come from the same read: a replica's reported
    /// SHA-256 is the content it serves.
    #[test]
    fn a_config_text_carries_the_hashes_of_the_bytes_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proxy.yaml");
        std::fs::write(&p, "routes: []\n").unwrap();
        let t = read_config_text(&p).unwrap();
        assert_eq!(t.text, "routes: []\n");
        assert_eq!(Some(t.sha256), sha256_file(&p));
        assert_eq!(Some(t.hash), hash_files(&[&p]));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        let e = read_config_text(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("world-writable"), "{e}");
    }
}
