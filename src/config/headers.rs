//! A route's `headers`: fields set on or removed from its requests (on their way upstream) and
//! its responses (the upstream's and limen's own), validated at load.
//!
//! Owns: their syntax, the names that may not be edited, and applying an edit to a header map.
//! Must not touch: the forwarding rules (`crate::headers`), which run before these edits.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Edits of one direction: `remove` first, then `set` (replacing any value).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// A route's `headers`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteHeaders {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaders {
    request: Option<RawEdits>,
    response: Option<RawEdits>,
}

/// Each name keeps where it was written, so an error points at the key, not at the route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdits {
    #[serde(default)]
    set: HashMap<Spanned<String>, String>,
    #[serde(default)]
    remove: Vec<Spanned<String>>,
}

/// A refused edit: why, and the line and column of its header's name.
#[derive(Debug)]
pub(super) struct EditError {
    pub(super) message: String,
    pub(super) at: (u64, u64),
}

fn at(key: &Spanned<String>) -> (u64, u64) {
    (key.referenced.line(), key.referenced.column())
}

/// Framing and connection fields: editing them would desynchronise the two sides of the proxy
/// (request smuggling, broken keep-alive), so they are limen's alone.
pub(super) const FORBIDDEN: &[&str] = &[
    "connection",
    "content-length",
    "transfer-encoding",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

fn name(side: &str, what: &str, raw: &str) -> Result<HeaderName, String> {
    if raw.starts_with(':') {
        return Err(format!(
            "headers.{side}.{what}: {raw:?} is an HTTP/2 pseudo-header, which limen sets itself"
        ));
    }
    let name = HeaderName::from_bytes(raw.as_bytes()).map_err(|_| {
        format!("headers.{side}.{what}: {raw:?} is not a valid header name (letters, digits and -)")
    })?;
    if matches!(name.as_str(), "client-cert" | "client-cert-chain") {
        return Err(format!(
            "headers.{side}.{what}: {raw:?} is set by tls.client_auth (forward: true) from the verified client certificate; it cannot be set or removed per route"
        ));
    }
    if FORBIDDEN.contains(&name.as_str()) {
        return Err(format!(
            "headers.{side}.{what}: {raw:?} is a connection or framing header, which limen manages itself; it cannot be set or removed per route"
        ));
    }
    Ok(name)
}

fn edits(side: &str, raw: Option<RawEdits>) -> Result<HeaderEdits, EditError> {
    let Some(raw) = raw else {
        return Ok(HeaderEdits::default());
    };
    let mut out = HeaderEdits::default();
    // In the order written, so the first error reported is the first in the file.
    let mut set: Vec<_> = raw.set.into_iter().collect();
    set.sort_by_key(|(k, _)| at(k));
    for (k, v) in set {
        let fail = |message: String| EditError {
            message,
            at: at(&k),
        };
        let n = name(side, "set", &k.value).map_err(fail)?;
        // Printable ASCII only (HeaderValue would take bytes 0x80-0xFF), and no whitespace at
        // either end, which HTTP/2 calls malformed (RFC 9113 8.2.1).
        let printable = v.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
        let padded = v.starts_with([' ', '\t']) || v.ends_with([' ', '\t']);
        let value = HeaderValue::from_str(&v)
            .ok()
            .filter(|_| printable && !padded)
            .ok_or_else(|| {
                fail(format!("headers.{side}.set: the value of {:?} is not a valid header value (printable ASCII, no line breaks, no space at either end)", k.value))
            })?;
        if out.set.iter().any(|(seen, _)| *seen == n) {
            return Err(fail(format!(
                "headers.{side}.set: {:?} is set twice (header names ignore case): keep one",
                k.value
            )));
        }
        out.set.push((n, value));
    }
    // Sorted by name, as the diff and the status page list them.
    out.set.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    for k in raw.remove {
        let n = name(side, "remove", &k.value).map_err(|message| EditError {
            message,
            at: at(&k),
        })?;
        out.remove.push(n);
    }
    Ok(out)
}

pub(super) fn headers_from(raw: Option<RawHeaders>) -> Result<RouteHeaders, EditError> {
    let raw = raw.unwrap_or_default();
    Ok(RouteHeaders {
        request: edits("request", raw.request)?,
        response: edits("response", raw.response)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spanned(s: &str) -> Spanned<String> {
        let here = serde_saphyr::Location::UNKNOWN;
        Spanned::new(s.to_string(), here, here)
    }

    #[test]
    fn edits_remove_then_set() {
        let e = HeaderEdits {
            set: vec![(
                HeaderName::from_static("x-env"),
                HeaderValue::from_static("prod"),
            )],
            remove: vec![
                HeaderName::from_static("x-env"),
                HeaderName::from_static("server"),
            ],
        };
        let mut h = HeaderMap::new();
        h.insert("x-env", HeaderValue::from_static("dev"));
        h.append("x-env", HeaderValue::from_static("test"));
        h.insert("server", HeaderValue::from_static("app/1.0"));
        e.apply(&mut h);
        assert_eq!(h.get_all("x-env").iter().count(), 1);
        assert_eq!(h["x-env"], "prod");
        assert!(!h.contains_key("server"));
    }

    #[test]
    fn framing_and_pseudo_headers_are_refused() {
        for bad in [
            "Content-Length",
            "transfer-encoding",
            "Host",
            ":path",
            "bad name",
        ] {
            let raw = RawEdits {
                set: HashMap::new(),
                remove: vec![spanned(bad)],
            };
            assert!(edits("request", Some(raw)).is_err(), "{bad}");
        }
        for value in ["line\nbreak", " padded", "padded\t", "caf\u{e9}", "nul\0"] {
            let raw = RawEdits {
                set: [(spanned("x-a"), value.to_string())].into(),
                remove: vec![],
            };
            assert!(edits("response", Some(raw)).is_err(), "{value:?}");
        }
        let raw = RawEdits {
            set: [(spanned("x-a"), "a fine value".to_string())].into(),
            remove: vec![],
        };
        assert!(edits("response", Some(raw)).is_ok());
        let raw = RawEdits {
            set: [
                (spanned("X-A"), "1".to_string()),
                (spanned("x-a"), "2".to_string()),
            ]
            .into(),
            remove: vec![],
        };
        let twice = edits("response", Some(raw)).map(|_| ()).unwrap_err();
        assert!(twice.message.contains("set twice"), "{}", twice.message);
    }
}
