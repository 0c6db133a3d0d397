//! Stage 2, prepare: the upstream request head (URI rewritten, headers per policy), built once and
//! kept for a retry.
//!
//! Owns: building the head. Must not touch: connections.

#[allow(unused_imports)]
use super::*;

/// The upstream request's head, ready to send.
#[derive(Clone)]
pub(super) struct Prepared {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) headers: HeaderMap,
}

/// Stage 2: the upstream request's head: hop-by-hop and look-alike headers gone, forwarding
/// headers set, the upgrade offer (if any) restated, the path rewritten for the route.
pub(super) fn prepare(
    parts: http::request::Parts,
    admitted: &Admitted,
    conn: &ConnInfo,
    cfg: &Config,
    offered: Option<HeaderValue>,
) -> Result<Prepared, ErrorKind> {
    let trusted = cfg
        .trusted_proxies
        .iter()
        .any(|b| b.contains(conn.peer.ip()));
    let mut headers = forwarded_request_headers(
        parts.headers,
        &parts.uri,
        parts.version,
        &HeaderPolicy {
            forwarding: &conn.forwarding,
            host: &admitted.host,
            trusted,
            allow_underscores: cfg.allow_underscores_in_headers,
            client_cert: conn.client_cert.as_ref().filter(|_| admitted.mtls),
        },
    );
    if parts.method == Method::OPTIONS {
        if let Some(n) = max_forwards(&headers) {
            headers.insert(header::MAX_FORWARDS, HeaderValue::from(n.saturating_sub(1)));
        }
    }
    if let Some(up) = offered {
        headers.insert(header::UPGRADE, up);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let route = &admitted.route;
    if let Some(host) = route.rewrite.as_ref().and_then(|r| r.host.as_deref()) {
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, v);
        }
    }
    if let Some(prefix) = route.forwarded_prefix() {
        if let Ok(v) = HeaderValue::from_str(prefix) {
            headers.insert(HeaderName::from_static("x-forwarded-prefix"), v);
        }
    }
    route.headers.request.apply(&mut headers);
    let target = route
        .upstream_target(&admitted.target)
        .ok_or(ErrorKind::BadRequest(
            "the rewritten path is not a valid path",
        ))?;
    // Most requests go up as they came: the client's own path is shared, not parsed again.
    let uri: Uri = match parts.uri.path_and_query() {
        Some(pq) if pq.as_str() == target => Uri::from(pq.clone()),
        _ => target
            .parse()
            .map_err(|_| ErrorKind::BadRequest("malformed request target"))?,
    };
    Ok(Prepared {
        method: parts.method,
        uri,
        headers,
    })
}

impl Prepared {
    /// The upstream request of one try, in HTTP/1.1 form (`exchange` turns it into HTTP/2 form
    /// for an HTTP/2 connection).
    pub(super) fn into_request(self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers;
        req
    }
}
