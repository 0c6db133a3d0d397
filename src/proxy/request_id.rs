//! The request id: kept from a client `request_id.trust` covers, else made here (a random
//! UUID, 122 random bits); sent upstream, returned on the response, written in the access log
//! and, through the request's span, in every log line limen writes while serving it. A W3C
//! `traceparent`'s trace id is logged beside it.
//!
//! Owns: choosing and making ids. Must not touch: anything but that one header.

#[allow(unused_imports)]
use super::*;

use crate::config::Trust;

/// Longest incoming id kept; a longer (or unprintable) one is replaced.
const MAX_ID: usize = 200;

/// The request's id: the incoming one when its sender is trusted and it is printable and short,
/// else a new one.
pub(super) fn request_id(headers: &HeaderMap, peer: IpAddr, cfg: &Config) -> HeaderValue {
    let rid = &cfg.request_id;
    let trusted = match rid.trust {
        Trust::All => true,
        Trust::None => false,
        Trust::TrustedProxies => cfg.trusted_proxies.iter().any(|b| b.contains(peer)),
    };
    let kept = trusted
        .then(|| headers.get(&rid.header))
        .flatten()
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= MAX_ID && b.iter().all(u8::is_ascii_graphic)
        });
    match kept {
        Some(v) => v.clone(),
        None => new_id(),
    }
}

/// Random bytes drawn from the system's generator this many at a time: one call per id cost
/// as much as the rest of an HTTP/2 request's own work (docs/performance.md).
const RANDOM_BATCH: usize = 16 * 64;

thread_local! {
    static RANDOM: std::cell::RefCell<([u8; RANDOM_BATCH], usize)> =
        const { std::cell::RefCell::new(([0; RANDOM_BATCH], RANDOM_BATCH)) };
}

/// 16 random bytes for one id, from this thread's batch (refilled when used up).
fn random_16() -> [u8; 16] {
    RANDOM.with(|r| {
        let mut r = r.borrow_mut();
        let (buf, used) = &mut *r;
        if *used + 16 > RANDOM_BATCH {
            if aws_lc_rs::rand::fill(buf).is_err() {
                // The system's randomness failing is not a reason to refuse a request; an id
                // made of the clock still tells requests apart in the log.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                return t.to_le_bytes();
            }
            *used = 0;
        }
        let mut b = [0u8; 16];
        b.copy_from_slice(&buf[*used..*used + 16]);
        // Each id's bytes are handed out once: none stays in memory after use.
        buf[*used..*used + 16].fill(0);
        *used += 16;
        b
    })
}

/// A version 4 UUID: 122 random bits, as text.
fn new_id() -> HeaderValue {
    let mut b = random_16();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut text = [0u8; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = b"0123456789abcdef"[usize::from(byte >> 4)];
        text[at + 1] = b"0123456789abcdef"[usize::from(byte & 15)];
        at += 2;
    }
    // One allocation holding the text, shared by every copy of the request head (a `Vec`'s
    // bytes would take a second one at the first copy).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// The trace id of a well-formed W3C `traceparent` (version-traceid-parentid-flags).
pub(super) fn trace_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|c| c != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    ok.then(|| trace.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_version_4_uuids_and_differ() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        // Across several refills of the thread's batch: all distinct, all in the one form.
        let many: std::collections::HashSet<_> = (0..500).map(|_| new_id()).collect();
        assert_eq!(many.len(), 500);
        assert!(many.iter().all(|v| {
            let b = v.as_bytes();
            b.len() == 36
                && b.iter().enumerate().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => *c == b'-',
                    _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
                })
        }));
    }

    #[test]
    fn a_traceparent_gives_its_trace_id_only_when_well_formed() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            assert_eq!(trace_id(&h), None, "{bad}");
        }
    }
}
