//! A `users_file`: htpasswd lines `user:hash`, bcrypt (`$2y$`, `$2b$`, `$2a$`) or argon2id only,
//! and the credentials verified lately.
//!
//! Owns: the file's syntax, the hash kinds accepted and their cost bounds, one verification,
//! and the cache of verified credentials. Must not touch: when a check runs (the caller bounds
//! how many at once), reading the file (the reloader does, as a watched secret).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a verified credential is trusted without hashing it again.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Verified credentials kept per file; past it the expired go, then the oldest half.
const CACHE_MAX: usize = 10_000;
/// Longest user name and password looked at: a longer credential is refused unhashed.
pub const MAX_CREDENTIAL: usize = 1024;
/// argon2id costs a users file may ask for: enough for any sane hash, not a memory bomb.
const ARGON2_MAX_MEMORY_KIB: u32 = 256 * 1024;
const ARGON2_MAX_PASSES: u32 = 16;
const ARGON2_MAX_LANES: u32 = 16;

/// One user's password hash, by kind.
#[derive(Clone)]
enum Hash {
    Bcrypt(String),
    Argon2id(String),
}

impl Hash {
    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            Hash::Argon2id(h) => {
                use argon2::PasswordVerifier;
                argon2::Argon2::default()
                    .verify_password(password, h.as_str())
                    .is_ok()
            }
        }
    }
}

/// A user name and password from a request, with the key they are remembered under.
pub struct Credential {
    pub user: String,
    password: Vec<u8>,
    key: [u8; 32],
}

/// One check under way: its verdict once made, or None when it could not run (busy).
pub type Check = tokio::sync::OnceCell<Option<Checked>>;

/// A loaded users file.
pub struct Users {
    entries: HashMap<String, Hash>,
    /// Keys: a keyed hash of user and password (the key is this process's own and random), so
    /// the cache holds no password and no hash an attacker could test offline. Values: until
    /// when the credential is trusted.
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    cache_key: aws_lc_rs::hmac::Key,
    /// Checks under way, by the same key: a credential sent by many requests at once (64
    /// connections opening together, or every client after the file changed) is hashed once,
    /// and the others wait for that verdict.
    checks: Mutex<HashMap<[u8; 32], Arc<Check>>>,
    /// Hash checks made, for tests and the status page.
    verified: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Users({} entries)", self.entries.len())
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Allowed,
    Denied,
}

impl Users {
    /// Parses a users file's bytes. Errors name the line, never its content (a hash is a
    /// secret too).
    pub fn parse(bytes: &[u8]) -> Result<Users, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "the file is not UTF-8".to_owned())?;
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {n}: not user:hash"))?;
            if user.is_empty()
                || user.len() > 255
                || !user.chars().all(|c| !c.is_control() && c != ':')
            {
                return Err(format!(
                    "line {n}: the user name must be 1 to 255 printable characters"
                ));
            }
            let hash = parse_hash(hash).map_err(|why| format!("line {n}: {why}"))?;
            if entries.insert(user.to_owned(), hash).is_some() {
                return Err(format!("line {n}: a user listed twice"));
            }
        }
        if entries.is_empty() {
            return Err("no users in the file".into());
        }
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let cache_key = aws_lc_rs::hmac::Key::generate(aws_lc_rs::hmac::HMAC_SHA256, &rng)
            .map_err(|_| "no randomness for the credential cache".to_owned())?;
        Ok(Users {
            entries,
            cache: Mutex::new(HashMap::new()),
            cache_key,
            checks: Mutex::new(HashMap::new()),
            verified: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many hash checks this file's users have cost.
    pub fn hash_checks(&self) -> u64 {
        self.verified.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A credential to check, with its key in the cache and in the checks under way (an HMAC,
    /// made once per request).
    pub fn credential(&self, user: String, password: Vec<u8>) -> Credential {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.cache_key);
        ctx.update(&(user.len() as u64).to_be_bytes());
        ctx.update(user.as_bytes());
        ctx.update(&password);
        let tag = ctx.sign();
        let mut key = [0u8; 32];
        key.copy_from_slice(&tag.as_ref()[..32]);
        Credential {
            user,
            password,
            key,
        }
    }

    /// The check of this credential under way, or a new one to run. Its value: the verdict, or
    /// None when the check could not run (busy).
    pub fn check_in_flight(&self, c: &Credential) -> Arc<Check> {
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        checks.entry(c.key).or_default().clone()
    }

    /// The check of this credential is over: later requests look at the cache, or check again.
    pub fn check_done(&self, c: &Credential) {
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        checks.remove(&c.key);
    }

    /// A credential verified within `CACHE_TTL`: no hashing needed.
    pub fn cached(&self, c: &Credential) -> bool {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(&c.key)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Checks a credential against its hash: CPU-heavy by design (run it off the async
    /// workers). An unknown user is checked against a decoy, so it costs the same.
    pub fn verify(&self, c: &Credential) -> Checked {
        let (user, password) = (c.user.as_str(), c.password.as_slice());
        if user.len() > MAX_CREDENTIAL || password.len() > MAX_CREDENTIAL {
            return Checked::Denied;
        }
        self.verified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ok = match self.entries.get(user) {
            Some(h) => h.matches(password),
            None => {
                // An unknown name costs what a wrong password costs: some user's hash is checked
                // and its answer thrown away, so timing tells no one which names exist.
                if let Some(decoy) = self.entries.values().next() {
                    let _ = decoy.matches(password);
                }
                false
            }
        };
        if !ok {
            return Checked::Denied;
        }
        let slot = c.key;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, until| *until > now);
            if cache.len() >= CACHE_MAX {
                let mut n = 0;
                cache.retain(|_, _| {
                    n += 1;
                    n % 2 == 0
                });
            }
        }
        cache.insert(slot, now + CACHE_TTL);
        Checked::Allowed
    }
}

/// A hash the file may hold, or why not (what to do about it).
fn parse_hash(h: &str) -> Result<Hash, String> {
    if h.starts_with("$2y$") || h.starts_with("$2b$") || h.starts_with("$2a$") {
        // `$2y$CC$` + 53 characters: a cost of 4 to 31 and the salt and hash.
        let cost: Option<u32> = h.get(4..6).and_then(|c| c.parse().ok());
        if h.len() != 60 || !cost.is_some_and(|c| (4..=31).contains(&c)) {
            return Err("a malformed bcrypt hash; make it again with `htpasswd -B`".into());
        }
        return Ok(Hash::Bcrypt(h.to_owned()));
    }
    if h.starts_with("$argon2id$") {
        check_argon2(h)?;
        return Ok(Hash::Argon2id(h.to_owned()));
    }
    let kind = if h.starts_with("$apr1$") || h.starts_with("$1$") {
        "MD5"
    } else if h.starts_with("{SHA}") {
        "SHA-1"
    } else if h.starts_with("$argon2") {
        "argon2 other than argon2id"
    } else if h.starts_with("$5$") || h.starts_with("$6$") {
        "SHA-crypt"
    } else {
        "crypt or plain text"
    };
    Err(format!(
        "a {kind} hash, which limen refuses (fast to crack): use bcrypt (`htpasswd -B`) or argon2id"
    ))
}

/// An argon2id PHC string, with costs within bounds.
fn check_argon2(h: &str) -> Result<(), String> {
    use argon2::password_hash::phc::PasswordHash;
    let parsed = PasswordHash::new(h).map_err(|_| "a malformed argon2id hash".to_owned())?;
    let get = |k: &str| -> Option<u32> {
        parsed
            .params
            .iter()
            .find(|(name, _)| name.as_str() == k)
            .and_then(|(_, v)| v.as_str().parse().ok())
    };
    let (m, t, p) = (get("m"), get("t"), get("p"));
    let within = matches!((m, t, p), (Some(m), Some(t), Some(p))
        if m <= ARGON2_MAX_MEMORY_KIB && (1..=ARGON2_MAX_PASSES).contains(&t) && (1..=ARGON2_MAX_LANES).contains(&p));
    if !within {
        return Err(format!(
            "an argon2id hash whose costs are out of bounds (m at most {ARGON2_MAX_MEMORY_KIB} KiB, t 1 to {ARGON2_MAX_PASSES}, p 1 to {ARGON2_MAX_LANES})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(users: &Users, user: &str, password: &[u8]) -> Credential {
        users.credential(user.to_owned(), password.to_vec())
    }

    fn argon2id(password: &str) -> String {
        use argon2::PasswordHasher;
        let params = argon2::Params::new(8 * 1024, 1, 1, None).unwrap();
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        a.hash_password_with_salt(password.as_bytes(), b"saltsaltsaltsalt")
            .unwrap()
            .to_string()
    }

    #[test]
    fn bcrypt_and_argon2id_verify_and_a_verified_credential_is_cached() {
        let file = format!(
            "# admins\nalice:{}\n\nbob:{}\n",
            bcrypt::hash("wonderland", 4).unwrap(),
            argon2id("builder")
        );
        let users = Users::parse(file.as_bytes()).unwrap();
        assert_eq!(users.len(), 2);
        assert!(!users.cached(&cred(&users, "alice", b"wonderland")));
        assert_eq!(
            users.verify(&cred(&users, "alice", b"wonderland")),
            Checked::Allowed
        );
        assert!(users.cached(&cred(&users, "alice", b"wonderland")));
        assert!(!users.cached(&cred(&users, "alice", b"wrong")));
        assert_eq!(
            users.verify(&cred(&users, "alice", b"wrong")),
            Checked::Denied
        );
        assert_eq!(
            users.verify(&cred(&users, "bob", b"builder")),
            Checked::Allowed
        );
        assert_eq!(
            users.verify(&cred(&users, "bob", b"Builder")),
            Checked::Denied
        );
        assert_eq!(
            users.verify(&cred(&users, "carol", b"wonderland")),
            Checked::Denied
        );
        assert_eq!(
            users.verify(&cred(&users, "alice", &[b'a'; 2000])),
            Checked::Denied
        );
    }

    #[test]
    fn weak_or_malformed_hashes_are_refused_by_line_without_showing_them() {
        for (line, why) in [
            ("u:$apr1$abc$def", "MD5"),
            ("u:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("u:plaintext", "crypt or plain text"),
            ("u:$6$salt$hash", "SHA-crypt"),
            (
                "u:$argon2i$v=19$m=4096,t=3,p=1$c2FsdA$aGFzaA",
                "argon2 other",
            ),
            ("u:$2y$10$short", "malformed bcrypt"),
            ("no colon", "not user:hash"),
        ] {
            let err = Users::parse(format!("# first\n{line}\n").as_bytes())
                .map(|_| ())
                .unwrap_err();
            assert!(
                err.starts_with("line 2: ") && err.contains(why),
                "{line}: {err}"
            );
            let secret = line.split_once(':').map_or(line, |(_, h)| h);
            assert!(!err.contains(secret), "{err}");
        }
        let huge = argon2id("x").replace("m=8192", "m=4194304");
        assert!(Users::parse(format!("u:{huge}\n").as_bytes()).is_err());
        assert!(Users::parse(b"# nobody\n").is_err());
        let twice = format!("a:{0}\na:{0}\n", bcrypt::hash("x", 4).unwrap());
        assert!(Users::parse(twice.as_bytes())
            .map(|_| ())
            .unwrap_err()
            .contains("twice"));
    }
}
