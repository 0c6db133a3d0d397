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

/// A version 4 UUID: 122 random bits, as text.
fn new_id() -> HeaderValue {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        // The system's randomness failing is not a reason to refuse a request; an id made of
        // the clock still tells requests apart in the log.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(byte & 15)]));
    }
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("-"))
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
