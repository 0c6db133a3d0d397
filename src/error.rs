//! One request error: what went wrong with a request (`ErrorKind`: the status and gRPC status the
//! client gets), which side is at fault (`Side`: client, upstream, limen), whether it may be tried
//! again (`Retry`), and the cause for the log. Every stage of the request path and the upstream
//! client return it; the proxy's one conversion turns it into a response.
//!
//! Owns: the classification of failures. Must not touch: responses (the proxy makes them) or
//! logging (the stage that sees the failure logs it, with `chain`).

use std::fmt;

use http::StatusCode;

use crate::config::RetryReason;

/// What the client is told, in general terms: the detail (addresses, OS and library errors) is
/// the cause, for the log and metrics only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
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
    /// The request uses a transfer coding other than chunked (RFC 9112 6.1: 501).
    NotImplemented,
    /// No upstream of the route accepted a connection (refused, timed out, or TLS failed).
    NoUpstream,
    /// limen's own limits (the upstream connection budget, the dial waiting room) had no room.
    Overloaded,
    /// The upstream closed, reset or broke the exchange.
    UpstreamFailed,
    /// The upstream's response cannot be relayed safely (framing, or a 101 nobody asked for).
    BadUpstreamResponse,
    /// No answer within the request's deadline (the route's timeout, or the client's).
    Timeout,
    BodyIdle,
    BodySlow,
    BodyAborted,
    /// The route's `access` lists refuse the client's address.
    Forbidden,
    /// The route's `auth.basic` wants a credential this request lacks or got wrong (the route
    /// adds its `WWW-Authenticate`).
    Unauthorized,
    /// Over the route's `rate_limit`: whole seconds until a token is back, at least 1.
    RateLimited(u32),
    /// The route's `auth.forward` service could not answer: refused, not let through.
    AuthUnavailable,
}

/// Who caused the failure: it decides whether an upstream is blamed (passive ejection) and what
/// the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Limen,
}

/// Whether the request may go to an upstream again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not by limen: the failure is the client's or limen's, or the deadline is spent.
    Never,
    /// No upstream saw the request (connect refused or timed out, TLS failed, a fresh connection
    /// that did not take it): it may go to another upstream whatever its method, and it is not a
    /// retry (no budget).
    Failover,
    /// The upstream may have processed the request: a re-send, only when `retry.on` names the
    /// reason, the request is replayable and the budget allows.
    Resend(RetryReason),
}

/// The cause of a failure, for the log.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// One request error.
#[derive(Debug)]
pub struct RequestError {
    pub kind: ErrorKind,
    pub side: Side,
    pub retry: Retry,
    pub cause: Option<Cause>,
}

impl ErrorKind {
    /// The side a failure of this kind is usually the fault of; the upstream client says
    /// otherwise where it knows better (a client's gRPC deadline).
    pub fn default_side(self) -> Side {
        match self {
            ErrorKind::BadRequest(_)
            | ErrorKind::Misdirected
            | ErrorKind::ClientAuthMismatch
            | ErrorKind::MethodNotAllowed
            | ErrorKind::NoRoute
            | ErrorKind::TooLarge
            | ErrorKind::NotImplemented
            | ErrorKind::BodyIdle
            | ErrorKind::BodySlow
            | ErrorKind::BodyAborted
            | ErrorKind::Forbidden
            | ErrorKind::Unauthorized
            | ErrorKind::RateLimited(_) => Side::Client,
            ErrorKind::AuthUnavailable => Side::Upstream,
            ErrorKind::NoUpstream
            | ErrorKind::UpstreamFailed
            | ErrorKind::BadUpstreamResponse
            | ErrorKind::Timeout => Side::Upstream,
            ErrorKind::Overloaded => Side::Limen,
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest(_) | ErrorKind::BodyAborted => StatusCode::BAD_REQUEST,
            ErrorKind::Misdirected | ErrorKind::ClientAuthMismatch => {
                StatusCode::MISDIRECTED_REQUEST
            }
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::NoUpstream | ErrorKind::UpstreamFailed | ErrorKind::BadUpstreamResponse => {
                StatusCode::BAD_GATEWAY
            }
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::BodyIdle | ErrorKind::BodySlow => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The text the client reads: fixed, printable ASCII without '%' (so a `grpc-message` needs
    /// no percent-encoding), and never an echo of any input.
    pub fn message(self) -> &'static str {
        match self {
            ErrorKind::BadRequest(why) => why,
            ErrorKind::Misdirected => "this connection's certificate does not cover the requested host; open a connection for that name",
            ErrorKind::ClientAuthMismatch => "this host verifies client certificates on connections of its own; open a new connection for that name",
            ErrorKind::MethodNotAllowed => "limen does not proxy this method",
            ErrorKind::NoRoute => "no route for this host and path",
            ErrorKind::TooLarge => "the request body is too large",
            ErrorKind::NotImplemented => "limen does not support this transfer coding; send the body chunked or with a Content-Length",
            ErrorKind::NoUpstream => "the upstream refused the connection or could not be reached",
            ErrorKind::UpstreamFailed => "the upstream closed the connection or failed to answer",
            ErrorKind::BadUpstreamResponse => "the upstream sent a response that cannot be relayed",
            ErrorKind::Timeout => "the upstream did not answer in time",
            ErrorKind::Overloaded => "the proxy is at its connection limit; try again shortly",
            ErrorKind::BodyIdle => "the request body stopped arriving",
            ErrorKind::BodySlow => "the request body arrived too slowly",
            ErrorKind::BodyAborted => "the request body was malformed or aborted",
            ErrorKind::Forbidden => "this route does not admit requests from this address",
            ErrorKind::Unauthorized => "this route needs a user name and password",
            ErrorKind::RateLimited(_) => "too many requests; try again after the time in Retry-After",
            ErrorKind::AuthUnavailable => "the route's authorization service did not answer; try again shortly",
        }
    }

    /// The connection cannot carry another request: its framing is in doubt, or an unread body
    /// is still on the wire.
    pub fn closes(self) -> bool {
        matches!(
            self,
            ErrorKind::BadRequest(_)
                | ErrorKind::TooLarge
                | ErrorKind::NotImplemented
                | ErrorKind::ClientAuthMismatch
                | ErrorKind::BadUpstreamResponse
                | ErrorKind::BodyIdle
                | ErrorKind::BodySlow
                | ErrorKind::BodyAborted
        )
    }

    /// The gRPC status code, as Envoy maps them.
    pub fn grpc_status(self) -> u8 {
        match self {
            ErrorKind::NoRoute | ErrorKind::MethodNotAllowed | ErrorKind::NotImplemented => 12, // UNIMPLEMENTED
            ErrorKind::Timeout | ErrorKind::BodyIdle | ErrorKind::BodySlow => 4, // DEADLINE_EXCEEDED
            ErrorKind::TooLarge | ErrorKind::RateLimited(_) => 8, // RESOURCE_EXHAUSTED
            ErrorKind::Forbidden => 7,                            // PERMISSION_DENIED
            ErrorKind::Unauthorized => 16,                        // UNAUTHENTICATED
            ErrorKind::AuthUnavailable => 14,                     // UNAVAILABLE
            ErrorKind::BadRequest(_) | ErrorKind::BodyAborted => 13, // INTERNAL
            ErrorKind::Misdirected
            | ErrorKind::ClientAuthMismatch
            | ErrorKind::NoUpstream
            | ErrorKind::UpstreamFailed
            | ErrorKind::BadUpstreamResponse
            | ErrorKind::Overloaded => 14, // UNAVAILABLE
        }
    }
}

impl RequestError {
    /// A failure of `kind`, blamed on its usual side, never retried, without a cause.
    pub fn new(kind: ErrorKind) -> RequestError {
        RequestError {
            kind,
            side: kind.default_side(),
            retry: Retry::Never,
            cause: None,
        }
    }

    pub fn side(mut self, side: Side) -> RequestError {
        self.side = side;
        self
    }

    pub fn retry(mut self, retry: Retry) -> RequestError {
        self.retry = retry;
        self
    }

    pub fn because(mut self, cause: impl Into<Cause>) -> RequestError {
        self.cause = Some(cause.into());
        self
    }

    /// A failure no upstream saw the request for: it fails over.
    pub fn unsent(cause: impl Into<Cause>) -> RequestError {
        RequestError::new(ErrorKind::NoUpstream)
            .retry(Retry::Failover)
            .because(cause)
    }

    /// Whether the upstream is to blame for it in passive outlier detection: its fault, and of a
    /// kind a retry (or failover) could avoid. A spent deadline or a response refused after the
    /// fact are not counted, as before the error was one type.
    pub fn blames_upstream(&self) -> bool {
        self.side == Side::Upstream && self.retry != Retry::Never
    }

    /// The cause with its own causes, for the log (hyper's own message is only "http2 error").
    pub fn chain(&self) -> String {
        match &self.cause {
            Some(c) => chain(c.as_ref()),
            None => self.kind.message().to_owned(),
        }
    }
}

impl From<ErrorKind> for RequestError {
    fn from(kind: ErrorKind) -> RequestError {
        RequestError::new(kind)
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.message())?;
        if let Some(c) = &self.cause {
            write!(f, ": {}", chain(c.as_ref()))?;
        }
        Ok(())
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// An error with its causes, joined by ": ".
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Many errors repeat their source in their own message; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 19] = [
        ErrorKind::Forbidden,
        ErrorKind::Unauthorized,
        ErrorKind::RateLimited(3),
        ErrorKind::AuthUnavailable,
        ErrorKind::NotImplemented,
        ErrorKind::BadRequest("x"),
        ErrorKind::Misdirected,
        ErrorKind::ClientAuthMismatch,
        ErrorKind::MethodNotAllowed,
        ErrorKind::NoRoute,
        ErrorKind::TooLarge,
        ErrorKind::NoUpstream,
        ErrorKind::Overloaded,
        ErrorKind::UpstreamFailed,
        ErrorKind::BadUpstreamResponse,
        ErrorKind::Timeout,
        ErrorKind::BodyIdle,
        ErrorKind::BodySlow,
        ErrorKind::BodyAborted,
    ];

    #[test]
    fn every_kind_has_a_status_a_grpc_status_a_side_and_a_safe_message() {
        for kind in ALL {
            let status = kind.status().as_u16();
            assert!((400..600).contains(&status), "{kind:?}");
            assert!((1..=16).contains(&kind.grpc_status()), "{kind:?}");
            let m = kind.message();
            assert!(
                m.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%'),
                "{kind:?}: {m}"
            );
            let e = RequestError::from(kind);
            assert_eq!(e.side, kind.default_side());
            assert_eq!(e.retry, Retry::Never);
            // Client faults are 4xx, upstream and limen faults 5xx; but for 501, which RFC 9112
            // names for a transfer coding the server does not know.
            assert_eq!(
                e.side == Side::Client,
                status < 500 || kind == ErrorKind::NotImplemented,
                "{kind:?} is blamed on {:?} but answers {status}",
                e.side
            );
        }
    }

    #[test]
    fn only_an_upstream_fault_a_retry_could_avoid_blames_the_upstream() {
        let refused = RequestError::unsent("connection refused");
        assert_eq!(refused.retry, Retry::Failover);
        assert!(refused.blames_upstream());
        let reset =
            RequestError::new(ErrorKind::UpstreamFailed).retry(Retry::Resend(RetryReason::Reset));
        assert!(reset.blames_upstream());
        let clients_deadline = RequestError::new(ErrorKind::Timeout).side(Side::Client);
        assert!(!clients_deadline.blames_upstream());
        let spent = RequestError::new(ErrorKind::Timeout);
        assert!(!spent.blames_upstream());
        let budget = RequestError::new(ErrorKind::Overloaded).retry(Retry::Failover);
        assert!(
            !budget.blames_upstream(),
            "limen's own limit is not the upstream's fault"
        );
    }

    #[test]
    fn the_log_gets_the_cause_chain_the_client_only_the_kind() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused by 10.0.0.5:80",
        );
        let e = RequestError::unsent(io);
        assert_eq!(e.chain(), "refused by 10.0.0.5:80");
        assert!(e.to_string().starts_with(ErrorKind::NoUpstream.message()));
        assert!(!ErrorKind::NoUpstream.message().contains("10.0.0.5"));
    }
}
