//! Stage 1, admit: the request is well formed, for a host this connection may serve (400/421),
//! routed (404), with an allowed method and a body within limits.
//!
//! Owns: the checks before anything is read or sent. Must not touch: upstreams.

#[allow(unused_imports)]
use super::*;

/// What admission learnt about a request.
pub(super) struct Admitted {
    pub(super) host: String,
    pub(super) route: Arc<Route>,
    /// The host is under a client-certificate policy, which this connection's handshake applied.
    pub(super) mtls: bool,
    /// The normalized path and the original query: what is routed on and sent upstream.
    pub(super) target: String,
}

/// Stage 1: the host (400), the connection's certificate covers it (421), the method (405), the
/// path normalized (400) and routed (404), and a declared body within the limit (413).
pub(super) fn admit<B>(
    req: &Request<B>,
    conn: &ConnInfo,
    snap: &Snapshot,
) -> Result<Admitted, ErrorKind> {
    let cfg = &*snap.config;
    let host = request_host(req).map_err(ErrorKind::BadRequest)?;
    let covered = match &conn.presented {
        Some(cert) => cert.covers(&host) || (conn.sni.is_none() && is_ip_literal(&host)),
        None => false,
    };
    if !covered {
        return Err(ErrorKind::Misdirected);
    }
    // No bypass by Host: a host under a tls.client_auth policy is served only on a connection
    // whose handshake applied that same policy (not another SNI's, nor the no-SNI one, even
    // when one certificate covers both names).
    // A rotated CA bundle counts as another policy: a certificate of a CA just removed does not
    // keep its access on a connection that stays open.
    let mtls = match snap.tls.policy_for_host(&host) {
        None => false,
        Some((p, roots))
            if conn
                .client_auth
                .as_ref()
                .is_some_and(|(a, r)| (Arc::ptr_eq(a, p) || a == p) && Arc::ptr_eq(r, roots)) =>
        {
            true
        }
        Some(_) => return Err(ErrorKind::ClientAuthMismatch),
    };
    if matches!(*req.method(), Method::CONNECT | Method::TRACE) {
        return Err(ErrorKind::MethodNotAllowed);
    }
    if matches!(req.version(), Version::HTTP_2 | Version::HTTP_3)
        && crate::headers::padded_value(req.headers())
    {
        return Err(ErrorKind::BadRequest(
            "a header field value starts or ends with whitespace",
        ));
    }
    // hyper reads the chunks of `gzip, chunked`: the gzip bytes would go upstream as the content.
    match crate::headers::transfer_codings(req.headers()) {
        crate::headers::Codings::Chunked => {}
        crate::headers::Codings::Unknown => return Err(ErrorKind::NotImplemented),
        crate::headers::Codings::Malformed => {
            return Err(ErrorKind::BadRequest("malformed Transfer-Encoding"))
        }
    }
    // `OPTIONS *` (asterisk-form) asks about the server as a whole: it goes where `/` goes, as `*`.
    let asterisk = *req.method() == Method::OPTIONS && req.uri().path() == "*";
    let path = if asterisk {
        std::borrow::Cow::Borrowed("/")
    } else {
        crate::normalize::normalize_path(req.uri().path(), cfg.escaped_slashes)
            .map_err(path_refusal)?
    };
    let route = snap
        .routes
        .lookup(&host, &path, &crate::routing::Facts::of(req))
        .ok_or(ErrorKind::NoRoute)?
        .clone();
    let target = match req.uri().query() {
        _ if asterisk => "*".to_owned(),
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    Ok(Admitted {
        host,
        route,
        mtls,
        target,
    })
}

/// Stage 1, last: a declared body within `limits.max_body_bytes` (413). Apart from `admit` so the
/// refusal is already the route's (its response edits apply).
pub(super) fn admit_body<B>(req: &Request<B>, cfg: &Config) -> Result<(), ErrorKind> {
    let max = cfg.limits.max_body_bytes;
    if max > 0 {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(ErrorKind::TooLarge);
        }
    }
    Ok(())
}

pub(super) fn max_forwards(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::MAX_FORWARDS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn path_refusal(e: crate::normalize::PathError) -> ErrorKind {
    use crate::normalize::PathError;
    ErrorKind::BadRequest(match e {
        PathError::NotAbsolute => "the request target is not an absolute path",
        PathError::BadEscape => "the path has a malformed percent-escape",
        PathError::EscapedSlash => "the path has an encoded slash or backslash",
        PathError::Backslash => "the path has a backslash",
        PathError::AboveRoot => "the path climbs above the root",
        PathError::DotParams => "the path has a dot segment with parameters",
    })
}
