//! Checking a request's credential for a route's `auth.basic`: the `Authorization` header read,
//! a cached verdict used when there is one, else the password hash checked on a blocking thread,
//! a bounded number at a time process-wide, so a flood of wrong passwords costs bounded CPU and
//! other routes keep their workers.
//!
//! Owns: the users file's form (`users`), the check's bounds. Must not touch: the answer to the
//! client (the request path makes it), reading files (the reloader does).

pub mod users;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use base64::Engine;
use tokio::sync::Semaphore;

pub use users::{Checked, Users};

/// Checks waiting for a hashing thread, process-wide; past it a check is answered busy at once
/// (a flood must not queue without end).
const MAX_WAITING: usize = 256;

/// What a route's basic auth decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basic {
    /// The verified user name, for `X-Forwarded-User`.
    Allowed(String),
    /// No credential, a malformed one, or a wrong one.
    Denied,
    /// Too many checks waiting: refused without looking.
    Busy,
}

/// Password hashes checked at once: half the cores (at least one), so hashing can never take
/// every core from the request path.
fn hashing() -> &'static Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Semaphore::new((cores / 2).max(1)))
    })
}

static WAITING: AtomicUsize = AtomicUsize::new(0);

/// Leaves the waiting count however the wait ends (the request may be dropped meanwhile).
struct Waiting;

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The user and password of a `Basic` credential (RFC 7617), if it is one and not too long.
pub fn basic_credential(value: &http::HeaderValue) -> Option<(String, Vec<u8>)> {
    let v = value.as_bytes();
    if v.len() > 4 * users::MAX_CREDENTIAL {
        return None;
    }
    let text = std::str::from_utf8(v).ok()?;
    let (scheme, token) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = std::str::from_utf8(&decoded[..colon]).ok()?.to_owned();
    Some((user, decoded[colon + 1..].to_vec()))
}

/// Checks `authorization` against `users`.
pub async fn check_basic(users: &Arc<Users>, authorization: Option<&http::HeaderValue>) -> Basic {
    let Some((user, password)) = authorization.and_then(basic_credential) else {
        return Basic::Denied;
    };
    let c = Arc::new(users.credential(user, password));
    if users.cached(&c) {
        return Basic::Allowed(c.user.clone());
    }
    // One hash per credential however many requests bring it at once.
    let check = users.check_in_flight(&c);
    let verdict = *check.get_or_init(|| hash_once(users, &c)).await;
    users.check_done(&c);
    match verdict {
        Some(Checked::Allowed) => Basic::Allowed(c.user.clone()),
        Some(Checked::Denied) => Basic::Denied,
        None => Basic::Busy,
    }
}

/// One hash check on a blocking thread, within the process-wide bounds; None: too many waiting.
async fn hash_once(users: &Arc<Users>, c: &Arc<users::Credential>) -> Option<Checked> {
    if WAITING.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
        WAITING.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let waiting = Waiting;
    let slot = hashing().clone().acquire_owned().await.ok()?;
    drop(waiting);
    let (users, c) = (users.clone(), c.clone());
    // The slot goes with the hashing itself: a client that leaves does not free it early.
    let checked = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        users.verify(&c)
    })
    .await;
    Some(checked.unwrap_or(Checked::Denied))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(s: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn a_basic_credential_is_read_by_rfc_7617() {
        // "alice:wonder:land": the password may hold a colon.
        let v = header("Basic YWxpY2U6d29uZGVyOmxhbmQ=");
        assert_eq!(
            basic_credential(&v),
            Some(("alice".to_owned(), b"wonder:land".to_vec()))
        );
        assert!(basic_credential(&header("basic  YWxpY2U6eA==")).is_some());
        assert_eq!(basic_credential(&header("Bearer YWxpY2U6eA==")), None);
        assert_eq!(basic_credential(&header("Basic !!!")), None);
        assert_eq!(
            basic_credential(&header("Basic YWxpY2U=")),
            None,
            "no colon"
        );
        let long = format!("Basic {}", "QUFB".repeat(2000));
        assert_eq!(basic_credential(&header(&long)), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_credential_sent_by_many_requests_at_once_is_hashed_once() {
        let file = format!("alice:{}\n", bcrypt::hash("pw", 8).unwrap());
        let users = Arc::new(Users::parse(file.as_bytes()).unwrap());
        // "alice:pw" and "alice:bad"
        let right = header("Basic YWxpY2U6cHc=");
        let wrong = header("Basic YWxpY2U6YmFk");
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (users, h) = (
                users.clone(),
                if i % 2 == 0 {
                    right.clone()
                } else {
                    wrong.clone()
                },
            );
            tasks.push(tokio::spawn(
                async move { check_basic(&users, Some(&h)).await },
            ));
        }
        let mut allowed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Basic::Allowed(u) => {
                    assert_eq!(u, "alice");
                    allowed += 1;
                }
                Basic::Denied => {}
                Basic::Busy => panic!("40 checks are not too many"),
            }
        }
        assert_eq!(allowed, 20);
        // One hash for the right password and one or a few for the wrong one (each wrong
        // verdict is shared only by the requests that came while it was being made).
        assert!(users.hash_checks() <= 4, "{} hashes", users.hash_checks());
    }
}
