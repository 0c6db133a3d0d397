//! Request-path normalization: the path limen routes on is the path the upstream will resolve.
//!
//! Owns: percent-decoding of unreserved characters, upper-casing the hex of the escapes that stay,
//! merging repeated slashes and removing dot segments (RFC 3986 6.2.2 and 5.2.4), and the policy
//! for encoded slashes. A route for `/public` must not serve `/public/../admin`, and a deny-route
//! for `/admin` must not be skipped by `/%61dmin` or `//admin`. Must not touch: the query, headers,
//! anything but the bytes of one path. A pure function, so it is fuzzed and unit-tested alone.
//! The bottom layer: `config` stores route prefixes in the form it makes.

use std::borrow::Cow;

/// What to do with `%2F` and `%5C` in a path (`path_normalization.escaped_slashes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Forward them as they are (upper-cased); they are not segment separators. APIs use them.
    #[default]
    Keep,
    /// Answer 400: for upstreams that decode them into separators.
    Reject,
}

/// Why a path cannot be routed; each is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path has an encoded slash or backslash")]
    EscapedSlash,
    #[error("the path has a backslash")]
    Backslash,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path has a dot segment with parameters")]
    DotParams,
}

/// A segment that servlet containers (Tomcat, Jetty) resolve as a dot segment once they strip its
/// `;parameters`: `..;x` is `..` to them and an ordinary name to everyone else, the classic
/// route bypass. Such segments are refused.
fn dot_with_params(seg: &[u8]) -> bool {
    match seg.iter().position(|&b| b == b';') {
        Some(i) => matches!(&seg[..i], b"." | b".."),
        None => false,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Nothing to do for most paths: no escape, no empty segment, no dot segment, no backslash.
fn already_normal(path: &[u8]) -> bool {
    if path.iter().any(|&b| b == b'%' || b == b'\\') {
        return false;
    }
    // Each segment is what follows a '/': empty (`//`, except a trailing one) or dot segments
    // need work.
    let mut segs = path.split(|&b| b == b'/').skip(1).peekable();
    while let Some(seg) = segs.next() {
        let last = segs.peek().is_none();
        if (seg.is_empty() && !last) || seg == b"." || seg == b".." || dot_with_params(seg) {
            return false;
        }
    }
    true
}

/// The normalized form of an origin-form path (no query). Borrowed when it is already normal.
pub fn normalize_path(path: &str, escaped: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if already_normal(raw) {
        return Ok(Cow::Borrowed(path));
    }
    // Decode unreserved escapes; keep the others, upper-cased. Decoded bytes are unreserved, so
    // they can never form a separator: only a literal '/' splits segments.
    let mut decoded: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'\\' {
            return Err(PathError::Backslash);
        }
        if b != b'%' {
            decoded.push(b);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let v = h << 4 | l;
        if is_unreserved(v) {
            decoded.push(v);
        } else {
            if (v == b'/' || v == b'\\') && escaped == EscapedSlashes::Reject {
                return Err(PathError::EscapedSlash);
            }
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            decoded.extend_from_slice(&[b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]);
        }
        i += 3;
    }

    let mut out: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split(|&b| b == b'/').skip(1) {
        trailing = false;
        match seg {
            b"" => trailing = true,
            b"." => trailing = true,
            s if dot_with_params(s) => return Err(PathError::DotParams),
            b".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for seg in &out {
        norm.push('/');
        // Only ASCII went in: the input was a str, and escapes decode to ASCII unreserved bytes.
        norm.push_str(std::str::from_utf8(seg).map_err(|_| PathError::BadEscape)?);
    }
    if trailing || out.is_empty() {
        norm.push('/');
    }
    Ok(Cow::Owned(norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p, EscapedSlashes::Keep).map(|c| c.into_owned())
    }

    #[test]
    fn dot_segments_go_and_cannot_climb_above_the_root() {
        assert_eq!(n("/x/../admin").unwrap(), "/admin");
        assert_eq!(n("/x/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/x/.%2E/admin").unwrap(), "/admin");
        assert_eq!(n("/./a/./b/.").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/a/../../b").unwrap_err(), PathError::AboveRoot);
        assert_eq!(n("/.well-known/x").unwrap(), "/.well-known/x");
        assert_eq!(n("/a/...").unwrap(), "/a/...");
    }

    #[test]
    fn slashes_merge_and_unreserved_escapes_decode() {
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/a//b///").unwrap(), "/a/b/");
        assert_eq!(n("/%61dmin").unwrap(), "/admin");
        assert_eq!(n("/a%7eb%2D").unwrap(), "/a~b-");
        assert_eq!(n("/a%3fb%c3%a9").unwrap(), "/a%3Fb%C3%A9");
        assert_eq!(n("/").unwrap(), "/");
        assert!(matches!(
            normalize_path("/api/v1", EscapedSlashes::Keep),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn encoded_slashes_are_kept_or_refused_and_bad_input_is_an_error() {
        assert_eq!(n("/a%2fb/%5c").unwrap(), "/a%2Fb/%5C");
        assert_eq!(
            normalize_path("/a%2Fb", EscapedSlashes::Reject).unwrap_err(),
            PathError::EscapedSlash
        );
        assert_eq!(n("/a%2").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a\\..\\b").unwrap_err(), PathError::Backslash);
        assert_eq!(n("*").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(n("").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(n("/pub/..;/admin").unwrap_err(), PathError::DotParams);
        assert_eq!(n("/pub/.;x/admin").unwrap_err(), PathError::DotParams);
        assert_eq!(n("/pub/%2e%2e;/admin").unwrap_err(), PathError::DotParams);
        assert_eq!(n("/a;b/c").unwrap(), "/a;b/c");
    }
}
