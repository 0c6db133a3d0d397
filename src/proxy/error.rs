//! limen's own answers: the one conversion of a `RequestError` into a response and its gRPC form
//! (the kinds, sides and messages are `crate::error`'s).
//!
//! Owns: the mapping from an error to what the client sees. Must not touch: logging of causes (the
//! stage that failed logs them).

#[allow(unused_imports)]
use super::*;

impl RequestError {
    /// The plain-text response for this error (`Connection: close` where the connection ends).
    /// The text is the kind's fixed message: the cause never reaches the client.
    pub fn into_response(self) -> Response<ResponseBody> {
        let kind = self.kind;
        let status = kind.status();
        let text = format!(
            "{} {}: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            kind.message()
        );
        let mut resp = plain(status, Bytes::from(text));
        if kind.closes() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The answer a gRPC client can read: a trailers-only response (HTTP 200, `grpc-status` and
    /// `grpc-message` in the only header block). 421 stays 421, so a client that coalesced
    /// connections retries on a new one.
    pub fn into_grpc_response(self) -> Response<ResponseBody> {
        let kind = self.kind;
        let mut resp = Response::new(ResponseBody::full(Bytes::new()));
        if kind.status() == StatusCode::MISDIRECTED_REQUEST {
            *resp.status_mut() = StatusCode::MISDIRECTED_REQUEST;
        }
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(kind.grpc_status())),
        );
        // The messages are printable ASCII without '%', so they need no percent-encoding.
        h.insert("grpc-message", HeaderValue::from_static(kind.message()));
        resp
    }
}

/// What a refusal tells the client to do next: `Retry-After` on a 429, the route's
/// `WWW-Authenticate` challenge on a 401.
pub(super) fn challenge(resp: &mut Response<ResponseBody>, kind: ErrorKind, route: Option<&Route>) {
    match kind {
        ErrorKind::RateLimited(secs) => {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        ErrorKind::Unauthorized => {
            if let Some(v) = route.and_then(|r| r.challenge.clone()) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        _ => {}
    }
}

/// Where `route`'s `redirect` sends this request (`target`: the normalized path and the query),
/// if it is a redirect route and the filled-in target is a valid field value.
pub fn redirect_target(
    route: &Route,
    scheme: &str,
    host: &str,
    target: &str,
) -> Option<(StatusCode, HeaderValue)> {
    let Action::Redirect(r) = &route.action else {
        return None;
    };
    // `{path}` is what follows the prefix when the route strips it.
    let t = route.upstream_path(target);
    let (path, query) = match t.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&*t, None),
    };
    let location = HeaderValue::from_str(&r.location(scheme, host, path, query)).ok()?;
    Some((r.status, location))
}

/// A redirect made by limen: the status, `Location` and a short body.
pub(super) fn redirect_answer(status: StatusCode, location: HeaderValue) -> Response<ResponseBody> {
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = plain(status, Bytes::from(text));
    resp.headers_mut().insert(header::LOCATION, location);
    resp
}

/// A plain-text response made by limen itself (errors and `respond` routes).
pub(super) fn plain(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// HEAD answers and 204/304 made by limen carry no body (RFC 9110 9.3.2, 15.3.5, 15.4.5); a HEAD
/// keeps the length the GET would have had.
pub(super) fn without_forbidden_body(resp: &mut Response<ResponseBody>, head: bool) {
    let status = resp.status();
    let no_content = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if !(head || no_content) {
        return;
    }
    if let Inner::Full(body) = &mut resp.body_mut().inner {
        let len = body.take().map_or(0, |b| b.len());
        let h = resp.headers_mut();
        if no_content {
            h.remove(header::CONTENT_LENGTH);
            h.remove(header::CONTENT_TYPE);
        } else {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
}
