//! limen's own answers: `ProxyError`, the one place a failure becomes a status, a message and its
//! gRPC form.
//!
//! Owns: the mapping from an error to what the client sees. Must not touch: logging of causes (the
//! stage that failed logs them).

#[allow(unused_imports)]
use super::*;

/// Why limen answered a request itself. Each variant says what happened in general terms; the
/// detail (addresses, OS and library errors) goes to the log and metrics, never to the client.
/// `into_response` is the one place that turns any of them into a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The request is malformed; the reason is fixed text, never an echo of the input.
    BadRequest(&'static str),
    /// The connection's certificate does not cover the request's host.
    Misdirected,
    /// The host has a client-certificate policy this connection's handshake did not apply (or
    /// applied with a CA bundle since rotated): it can never serve that host, so it closes.
    ClientAuthMismatch,
    MethodNotAllowed,
    NoRoute,
    /// The declared or received request body is over `limits.max_body_bytes`.
    TooLarge,
    /// No upstream of the route accepted a connection.
    NoUpstream,
    /// limen's own upstream connection budget (from the open-file limit) had no room in time.
    Overloaded,
    /// The upstream closed, reset or broke the exchange.
    UpstreamFailed,
    /// The upstream's response cannot be relayed safely (framing, or a 101 nobody asked for).
    BadUpstreamResponse,
    /// The upstream did not answer within the route's timeout.
    Timeout,
    BodyIdle,
    BodySlow,
    BodyAborted,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BodyAborted => StatusCode::BAD_REQUEST,
            ProxyError::Misdirected | ProxyError::ClientAuthMismatch => {
                StatusCode::MISDIRECTED_REQUEST
            }
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoUpstream
            | ProxyError::UpstreamFailed
            | ProxyError::BadUpstreamResponse => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyIdle | ProxyError::BodySlow => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub(super) fn message(self) -> &'static str {
        match self {
            ProxyError::BadRequest(why) => why,
            ProxyError::Misdirected => "this connection's certificate does not cover the requested host; open a connection for that name",
            ProxyError::ClientAuthMismatch => "this host verifies client certificates on connections of its own; open a new connection for that name",
            ProxyError::MethodNotAllowed => "limen does not proxy this method",
            ProxyError::NoRoute => "no route for this host and path",
            ProxyError::TooLarge => "the request body is too large",
            ProxyError::NoUpstream => "the upstream refused the connection or could not be reached",
            ProxyError::UpstreamFailed => "the upstream closed the connection or failed to answer",
            ProxyError::BadUpstreamResponse => "the upstream sent a response that cannot be relayed",
            ProxyError::Timeout => "the upstream did not answer in time",
            ProxyError::Overloaded => "the proxy is at its connection limit; try again shortly",
            ProxyError::BodyIdle => "the request body stopped arriving",
            ProxyError::BodySlow => "the request body arrived too slowly",
            ProxyError::BodyAborted => "the request body was malformed or aborted",
        }
    }

    /// The connection cannot carry another request: its framing is in doubt, or an unread body
    /// is still on the wire.
    pub(super) fn closes(self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::TooLarge
                | ProxyError::ClientAuthMismatch
                | ProxyError::BadUpstreamResponse
                | ProxyError::BodyIdle
                | ProxyError::BodySlow
                | ProxyError::BodyAborted
        )
    }

    /// The plain-text response for this error (`Connection: close` where the connection ends).
    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        let text = format!(
            "{} {}: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.message()
        );
        let mut resp = plain(status, Bytes::from(text));
        if self.closes() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl ProxyError {
    /// The gRPC status code for this error, as Envoy maps them.
    pub(super) fn grpc_status(self) -> u8 {
        match self {
            ProxyError::NoRoute | ProxyError::MethodNotAllowed => 12, // UNIMPLEMENTED
            ProxyError::Timeout | ProxyError::BodyIdle | ProxyError::BodySlow => 4, // DEADLINE_EXCEEDED
            ProxyError::TooLarge => 8, // RESOURCE_EXHAUSTED
            ProxyError::BadRequest(_) | ProxyError::BodyAborted => 13, // INTERNAL
            ProxyError::Misdirected
            | ProxyError::ClientAuthMismatch
            | ProxyError::NoUpstream
            | ProxyError::UpstreamFailed
            | ProxyError::BadUpstreamResponse
            | ProxyError::Overloaded => 14, // UNAVAILABLE
        }
    }

    /// The answer a gRPC client can read: a trailers-only response (HTTP 200, `grpc-status` and
    /// `grpc-message` in the only header block). 421 stays 421, so a client that coalesced
    /// connections retries on a new one.
    pub fn into_grpc_response(self) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::full(Bytes::new()));
        if self.status() == StatusCode::MISDIRECTED_REQUEST {
            *resp.status_mut() = StatusCode::MISDIRECTED_REQUEST;
        }
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_status())),
        );
        // The messages are printable ASCII without '%', so they need no percent-encoding.
        h.insert("grpc-message", HeaderValue::from_static(self.message()));
        resp
    }
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
