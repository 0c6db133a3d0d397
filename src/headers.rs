//! Header rules shared by both directions of the request path: hop-by-hop fields (and those
//! `Connection` names), underscore look-alikes, transfer-coding checks of an upstream's framing,
//! and trailer cleaning.
//!
//! Owns: the lists of names limen sets, strips or guards. Functions of a `HeaderMap` alone, fuzzed
//! through `proxy`'s header stages. Imports nothing of the crate.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers, including those the Connection header names. TE survives only as
/// "trailers".
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (cheap compares for standard headers)
    // spares a dozen hashed removals.
    if !headers
        .keys()
        .any(|k| k == header::TE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = tokens(headers, header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let keep_trailers = has_token(headers, header::TE, "trailers");
    headers.remove(header::TE);
    if keep_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// One of the comma-separated tokens of field `name` is `token` (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The comma-separated tokens of every field `name`, trimmed, empty ones skipped.
pub fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Names limen sets or strips. A request field that differs from one of them only by `_` for `-`
/// is dropped even when underscores are allowed: CGI, WSGI, Rack and PHP map both spellings to
/// the same variable, so `X_Forwarded_For` would override what limen set.
const GUARDED_NAMES: [&str; 9] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "content-length",
    "te",
    "upgrade",
];

/// Fields that carry forwarding facts: set by limen, or by a trusted proxy before it.
const FORWARDING_NAMES: [&str; 13] = [
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
    "http2-settings",
    "client-cert",
    "client-cert-chain",
    "x-forwarded-user",
];

/// RFC 9440's fields: the client certificate limen verified, for the upstream.
pub const CLIENT_CERT: HeaderName = HeaderName::from_static("client-cert");
pub const CLIENT_CERT_CHAIN: HeaderName = HeaderName::from_static("client-cert-chain");

/// `Client-Cert` (the leaf) and `Client-Cert-Chain` (the rest, in the order sent) as RFC 8941
/// byte sequences: `:base64 of the DER:`.
#[derive(Debug, Clone)]
pub struct ClientCertFields {
    pub cert: HeaderValue,
    pub chain: Option<HeaderValue>,
}

/// `Client-Cert-Chain` is left out beyond these (the leaf is always sent).
const MAX_CHAIN_CERTS: usize = 8;
const MAX_CHAIN_FIELD: usize = 16 * 1024;

/// The fields for a verified chain, leaf first. None: no certificate.
pub fn client_cert_fields<C: AsRef<[u8]>>(chain: &[C]) -> Option<ClientCertFields> {
    use base64::Engine;
    let seq = |der: &C| {
        format!(
            ":{}:",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    };
    let (leaf, rest) = chain.split_first()?;
    let cert = HeaderValue::from_str(&seq(leaf)).ok()?;
    // The chain is what the client sent beyond the leaf's path: bounded, so a client cannot make
    // every request it sends carry tens of kilobytes upstream.
    let chain = (!rest.is_empty() && rest.len() <= MAX_CHAIN_CERTS)
        .then(|| rest.iter().map(seq).collect::<Vec<_>>().join(", "))
        .filter(|v| v.len() <= MAX_CHAIN_FIELD)
        .and_then(|v| HeaderValue::from_str(&v).ok());
    Some(ClientCertFields { cert, chain })
}

/// A client's own `Client-Cert` fields never pass, whoever sent them: only limen vouches.
pub fn strip_client_cert(headers: &mut HeaderMap) {
    headers.remove(CLIENT_CERT);
    headers.remove(CLIENT_CERT_CHAIN);
    // The same for the user `auth` names: on every route, whoever sent it.
    headers.remove(X_FORWARDED_USER);
}

/// The user a route's `auth.basic` verified, for the upstream.
pub const X_FORWARDED_USER: HeaderName = HeaderName::from_static("x-forwarded-user");
/// Drops request fields whose names hold `_` (all of them unless `allow`; with `allow`, only the
/// look-alikes of `GUARDED_NAMES`), as nginx does by default.
pub fn drop_underscored(headers: &mut HeaderMap, allow: bool) {
    if !headers.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            k.as_str().contains('_')
                && (!allow || {
                    let dashed = k.as_str().replace('_', "-");
                    GUARDED_NAMES.contains(&dashed.as_str())
                        || FORWARDING_NAMES.contains(&dashed.as_str())
                })
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// An upstream's framing, checked like a client's (RFC 9112 6.1, 6.3): a transfer coding list must
/// end in `chunked` (anything else would be read to the connection's end and relayed as content),
/// and Content-Length beside Transfer-Encoding is removed. Ok(false): relay the response but
/// never reuse the connection, whose framing is in doubt.
pub fn check_response_framing(headers: &mut HeaderMap) -> Result<bool, &'static str> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(true);
    }
    match transfer_codings(headers) {
        Codings::Chunked => {}
        Codings::Unknown => {
            return Err("a transfer coding other than chunked (limen does not decode them)")
        }
        Codings::Malformed => return Err("chunked is applied more than once or not last"),
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        headers.remove(header::CONTENT_LENGTH);
        return Ok(false);
    }
    Ok(true)
}

/// A field value that starts or ends with whitespace: malformed in HTTP/2 (RFC 9113 8.2.1), where
/// no parser trims it as HTTP/1.1's does, so it would reach the other side as it is.
pub fn padded_value(headers: &HeaderMap) -> bool {
    headers.values().any(|v| {
        let b = v.as_bytes();
        matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
    })
}

/// What a message's `Transfer-Encoding` asks of its reader, all its lines together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codings {
    /// Exactly `chunked` (or none at all): the one coding limen reads.
    Chunked,
    /// A coding other than chunked (`gzip, chunked`): relayed as it is, its bytes would be taken
    /// for the content.
    Unknown,
    /// `chunked` twice, or not last (RFC 9112 6.1).
    Malformed,
}

/// `Transfer-Encoding` read across all its field lines.
pub fn transfer_codings(headers: &HeaderMap) -> Codings {
    let mut chunked = 0usize;
    let mut seen = 0usize;
    let mut last_chunked = false;
    for t in tokens(headers, header::TRANSFER_ENCODING) {
        seen += 1;
        last_chunked = t.eq_ignore_ascii_case("chunked");
        chunked += usize::from(last_chunked);
    }
    if seen == 0 || (seen == 1 && chunked == 1) {
        return Codings::Chunked;
    }
    if chunked > 1 || !last_chunked {
        return Codings::Malformed;
    }
    Codings::Unknown
}

/// Trailer fields that describe framing, routing or one hop never pass (RFC 9110 6.5.1).
pub fn clean_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers);
    drop_underscored(trailers, false);
    // Adapters that merge trailers into the header section must not learn forwarding facts from
    // them either.
    let framing = ["content-length", "host", "trailer"];
    for name in framing.into_iter().chain(FORWARDING_NAMES) {
        if trailers.contains_key(name) {
            trailers.remove(name);
        }
    }
}
