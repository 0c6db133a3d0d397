//! The headers limen adds and strips on the way up and down: the Host the client named,
//! `X-Forwarded-*`/`Forwarded` from the peer (trusted proxies kept), cookies joined, hop-by-hop
//! removed.
//!
//! Owns: header policy. Must not touch: bodies or routing.

#[allow(unused_imports)]
use super::*;

/// Splits `host[:port]` (with `[v6]` brackets) and lower-cases the host. None when malformed.
pub fn host_without_port(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok()))
        {
            return None;
        }
        &rest[..end]
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            Some(_) => return None,
            None => authority,
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// The request's host: HTTP/2's `:authority` (which must agree with any `host` header), else the
/// one and only `Host` header.
pub(super) fn request_host<B>(req: &Request<B>) -> Result<String, &'static str> {
    let hosts = req.headers().get_all(header::HOST);
    let mut iter = hosts.iter();
    let first = iter.next();
    let second = iter.next();
    if matches!(req.version(), Version::HTTP_2 | Version::HTTP_3) {
        let auth = req.uri().authority().map(|a| a.as_str());
        let raw = match (auth, first) {
            (Some(a), Some(h)) => {
                if second.is_some() || !h.as_bytes().eq_ignore_ascii_case(a.as_bytes()) {
                    return Err(":authority and host disagree");
                }
                a
            }
            (Some(a), None) => a,
            (None, Some(h)) => h.to_str().map_err(|_| "malformed host header")?,
            (None, None) => return Err("missing :authority"),
        };
        return host_without_port(raw).ok_or("malformed :authority");
    }
    let h = match (first, second) {
        (Some(h), None) => h,
        (None, _) => return Err("missing Host header"),
        (Some(_), Some(_)) => return Err("more than one Host header"),
    };
    let h = h.to_str().map_err(|_| "malformed Host header")?;
    if let Some(a) = req.uri().authority() {
        // absolute-form: the target's authority rules and Host is ignored (RFC 9112 3.2.2).
        return host_without_port(a.as_str()).ok_or("malformed request target");
    }
    host_without_port(h).ok_or("malformed Host header")
}

/// What a connection contributes to forwarding headers, worked out once per connection rather than
/// once per request.
#[derive(Debug)]
pub struct PeerForwarding {
    /// The client address as `X-Forwarded-For` carries it.
    pub(super) xff: HeaderValue,
    /// The `for=` node of `Forwarded` (IPv6 quoted and bracketed, RFC 7239).
    pub(super) node: String,
    /// The fields made for the last host the connection's requests named: a connection mostly
    /// names one, and its next request then takes them without making them again.
    last: std::sync::Mutex<Option<HostFields>>,
}

/// The per-host forwarding fields of one connection.
#[derive(Debug, Clone)]
struct HostFields {
    authority: Box<str>,
    host: Box<str>,
    /// `Host` upstream, from the request's authority.
    authority_value: Option<HeaderValue>,
    /// Our own `Forwarded` element.
    forwarded: Option<HeaderValue>,
    forwarded_host: Option<HeaderValue>,
}

impl PeerForwarding {
    pub fn new(peer: IpAddr) -> PeerForwarding {
        let ip = peer.to_canonical().to_string();
        let node = match peer.to_canonical() {
            IpAddr::V4(_) => ip.clone(),
            IpAddr::V6(_) => format!("\"[{ip}]\""),
        };
        PeerForwarding {
            xff: HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown")),
            node,
            last: std::sync::Mutex::new(None),
        }
    }

    /// The fields for `host` (routed on) and `authority` (as the request named it): made once
    /// per host a connection names in a row, then shared (a `HeaderValue` clone is a count).
    fn host_fields(&self, authority: &str, host: &str) -> HostFields {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = last.as_ref() {
            if &*f.authority == authority && &*f.host == host {
                return f.clone();
            }
        }
        let mut ours = String::with_capacity(32 + self.node.len() + host.len());
        ours.push_str("for=");
        ours.push_str(&self.node);
        ours.push_str(";host=\"");
        ours.push_str(host);
        ours.push_str("\";proto=https");
        let shared =
            |s: &str| HeaderValue::from_maybe_shared(Bytes::copy_from_slice(s.as_bytes())).ok();
        let made = HostFields {
            authority: authority.into(),
            host: host.into(),
            authority_value: (!authority.is_empty()).then(|| shared(authority)).flatten(),
            forwarded: shared(&ours),
            forwarded_host: shared(host),
        };
        *last = Some(made.clone());
        made
    }
}

/// Joins what a trusted proxy sent before us with our own entry.
pub(super) fn chain(headers: &HeaderMap, name: &HeaderName, ours: &[u8]) -> Option<HeaderValue> {
    let mut out: Vec<u8> = Vec::with_capacity(64);
    for v in headers.get_all(name) {
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ours);
    HeaderValue::from_bytes(&out).ok()
}

fn set_forwarded(
    headers: &mut HeaderMap,
    fwd: &PeerForwarding,
    fields: &HostFields,
    trusted: bool,
) {
    let xff = HeaderName::from_static("x-forwarded-for");
    // `insert` replaces every earlier value, which is what an untrusted client's values deserve.
    let xff_value = if trusted {
        chain(headers, &xff, fwd.xff.as_bytes())
    } else {
        Some(fwd.xff.clone())
    };
    if let Some(v) = xff_value {
        headers.insert(xff, v);
    }

    let value = match &fields.forwarded {
        Some(ours) if trusted => chain(headers, &header::FORWARDED, ours.as_bytes()),
        ours => ours.clone(),
    };
    if let Some(v) = value {
        headers.insert(header::FORWARDED, v);
    }

    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
    if let Some(v) = fields.forwarded_host.clone() {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
}

/// HTTP/2 may split cookies into several fields; HTTP/1.1 wants one, joined by "; "
/// (RFC 9113 8.2.3).
pub(super) fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

pub(super) fn is_ip_literal(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
}

/// What decides the request headers sent upstream, besides the client's own.
pub struct HeaderPolicy<'a> {
    pub forwarding: &'a PeerForwarding,
    /// The host routed on.
    pub host: &'a str,
    /// The peer is a trusted proxy: its forwarding headers are extended, not replaced.
    pub trusted: bool,
    pub allow_underscores: bool,
    /// The verified client certificate to forward (RFC 9440), if the route's host asks for it.
    pub client_cert: Option<&'a crate::headers::ClientCertFields>,
}

/// The request-header half of `prepare`, a function of its inputs alone (and fuzzed as one):
/// hop-by-hop fields and the ones `Connection` names gone, underscore look-alikes gone, the Host
/// routed on kept, HTTP/2 cookies joined, forwarding headers set.
pub fn forwarded_request_headers(
    mut headers: HeaderMap,
    uri: &Uri,
    version: Version,
    policy: &HeaderPolicy<'_>,
) -> HeaderMap {
    let authority = uri.authority().map_or("", |a| a.as_str());
    let fields = policy.forwarding.host_fields(authority, policy.host);
    // The Host sent upstream is the one routed on; a client's `Connection: host` cannot remove it.
    let host_value = match uri.authority() {
        Some(_) => fields.authority_value.clone(),
        None => headers.get(header::HOST).cloned(),
    };
    strip_hop_by_hop(&mut headers);
    crate::headers::strip_client_cert(&mut headers);
    drop_underscored(&mut headers, policy.allow_underscores);
    if let Some(v) = host_value {
        headers.insert(header::HOST, v);
    }
    if matches!(version, Version::HTTP_2 | Version::HTTP_3) {
        join_cookies(&mut headers);
    }
    if !policy.trusted {
        // Other proxies' conventions for the same facts, which only a trusted peer may assert.
        for name in [
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-server",
        ] {
            if headers.contains_key(name) {
                headers.remove(name);
            }
        }
    }
    set_forwarded(&mut headers, policy.forwarding, &fields, policy.trusted);
    if let Some(c) = policy.client_cert {
        headers.insert(crate::headers::CLIENT_CERT, c.cert.clone());
        if let Some(chain) = &c.chain {
            headers.insert(crate::headers::CLIENT_CERT_CHAIN, chain.clone());
        }
    }
    // A gateway MUST send Via in each request it forwards (RFC 9110 7.6.3); the received
    // protocol is the client's, the pseudonym says nothing about the host.
    let ours = match version {
        Version::HTTP_2 => "2 limen",
        Version::HTTP_3 => "3 limen",
        Version::HTTP_10 => "1.0 limen",
        _ => "1.1 limen",
    };
    if !headers.contains_key(header::VIA) {
        headers.insert(header::VIA, HeaderValue::from_static(ours));
    } else if let Some(v) = chain(&headers, &header::VIA, ours.as_bytes()) {
        headers.insert(header::VIA, v);
    }
    headers
}

/// The response-header half of `respond` (fuzzed on its own): framing checked, hop-by-hop fields
/// gone. Ok(false): relay, but never reuse the connection.
pub fn relayed_response_headers(headers: &mut HeaderMap) -> Result<bool, &'static str> {
    let reusable = check_response_framing(headers)?;
    strip_hop_by_hop(headers);
    Ok(reusable)
}
