//! The upstream client: one exchange with one upstream, from checkout to the connection's return.
//!
//! Owns: checkout (a pooled HTTP/1.1 connection, a stream slot on a shared HTTP/2 connection, or
//! a dial, all bounded by the request's deadline), the request in the form the connection speaks,
//! a stale pooled connection's request sent again once on a fresh one, HTTP/2 refusals
//! (REFUSED_STREAM, or beyond a GOAWAY) sent again, the wait for the response head, and the
//! connection's release when both bodies end cleanly (`Lease`). Requests and health checks both
//! go through `send`. Must not touch: which upstream is tried, retries across upstreams, logging
//! (the caller knows the route), metrics.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use super::{DialFailure, PooledConn, Upstream};
use crate::body::{BodyState, RequestBody, BODY_DONE, BODY_OK};
use crate::config::{RetryReason, UpstreamScheme};
use crate::error::{ErrorKind, RequestError, Retry, Side};

/// What bounds one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Each dial's TCP connect, and its TLS handshake (`timeouts.upstream_connect`).
    pub connect: Duration,
    /// The checkout (a pooled connection, a dial, or waiting for another request's dial) is over
    /// by then, however many dials it takes.
    pub checkout_by: tokio::time::Instant,
    /// The wait for the response head, counted from the end of the request body.
    pub response: Duration,
    /// `response` is the client's own deadline (a `grpc-timeout` shorter than the route's): when
    /// it runs out the client is at fault, and nothing is retried.
    pub clients: bool,
    /// How long the upstream may leave a request body it was handed unread
    /// (`timeouts.upstream_write`).
    pub write: Duration,
}

/// An exchange that gave no response to relay.
pub struct UpstreamError {
    pub error: RequestError,
    /// The `result` label of `limen_upstream_requests_total`: `connect_error`, `tls_error`,
    /// `error` or `timeout`.
    pub outcome: &'static str,
    /// The request, when no upstream took it: it may go elsewhere as it is.
    pub unsent: Option<Box<Request<RequestBody>>>,
}

impl std::fmt::Debug for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamError")
            .field("error", &self.error)
            .field("outcome", &self.outcome)
            .field("unsent", &self.unsent.is_some())
            .finish()
    }
}

/// The connection a response came on, until its exchange ends.
pub struct Lease {
    conn: PooledConn,
    /// The request body's state: the connection is reused only when it was sent whole.
    request_body: Arc<BodyState>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.conn.upstream().authority)
            .finish()
    }
}

impl Lease {
    pub fn upstream(&self) -> &Arc<Upstream> {
        self.conn.upstream()
    }

    /// The exchange is over: the connection goes back to its pool when the response body was read
    /// to its end and the request body was sent whole; otherwise it is closed (an HTTP/2 one is
    /// shared and stays).
    pub fn finish(self, response_ended: bool) {
        if response_ended && self.request_body.get() == BODY_DONE {
            self.conn.release();
        }
    }
}

/// One exchange with `up`: checkout, send (again on a fresh connection if a pooled one was
/// stale, again after an HTTP/2 refusal of a request whose body was whole), and the response
/// head awaited. A request no connection took comes back in the error, to fail over.
pub async fn send(
    up: &Arc<Upstream>,
    req: Request<RequestBody>,
    deadlines: &Deadlines,
) -> Result<(Response<Incoming>, Lease), UpstreamError> {
    // A pooled connection ready now needs no timer; only a wait is bounded by the deadline.
    let conn = match up.checkout_now() {
        Some(c) => c,
        None => {
            match tokio::time::timeout_at(deadlines.checkout_by, up.checkout(deadlines.connect))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(dial_failed(e, req)),
                Err(_) => {
                    return Err(UpstreamError {
                        // The request's whole time went on waiting for a connection: nothing is left
                        // to try another upstream with.
                        error: RequestError::new(ErrorKind::Timeout)
                            .because("no upstream connection within the request's deadline"),
                        outcome: "connect_error",
                        unsent: Some(Box::new(req)),
                    });
                }
            }
        }
    };
    exchange(req, conn, deadlines).await
}

fn dial_failed(e: DialFailure, req: Request<RequestBody>) -> UpstreamError {
    let (outcome, error) = e.classify();
    UpstreamError {
        error,
        outcome,
        unsent: Some(Box::new(req)),
    }
}

/// The request on `conn`, and the response head awaited under the deadline.
async fn exchange(
    mut req: Request<RequestBody>,
    conn: PooledConn,
    deadlines: &Deadlines,
) -> Result<(Response<Incoming>, Lease), UpstreamError> {
    let body_state = req.body().state.clone();
    let h2 = conn.sender.is_h2();
    if req.version() == Version::HTTP_2 && !h2 {
        // Already in HTTP/2 form from an earlier try; this upstream speaks HTTP/1.1.
        return Err(UpstreamError {
            error: RequestError::new(ErrorKind::UpstreamFailed)
                .because("the upstream changed protocol between connections"),
            outcome: "connect_error",
            unsent: None,
        });
    }
    if h2 && req.version() != Version::HTTP_2 {
        let tls = conn.upstream().scheme == UpstreamScheme::Https;
        if let Err(e) = to_h2_form(&mut req, tls) {
            return Err(UpstreamError {
                error: e,
                outcome: "error",
                unsent: None,
            });
        }
    }
    let mut sending = Sending {
        conn,
        h2,
        connect: deadlines.connect,
        spare: None,
        refusals: 0,
    };
    // A request whose body is complete is kept as a copy, to go again after a refusal.
    sending.spare = (h2 && req.body().is_end_stream()).then(|| head_copy(&req));
    let sent = {
        let exchange = sending.run(req);
        tokio::pin!(exchange);
        // The first look comes within `write` while the body is on its way, else at the
        // response deadline; each look sets the next.
        let first = match response_due(&body_state, deadlines) {
            Due::At(at) => at,
            Due::WriteStalled | Due::Failed => tokio::time::Instant::now(),
        };
        let deadline = tokio::time::sleep_until(first);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = &mut exchange => break Some(r),
                () = &mut deadline => {
                    match response_due(&body_state, deadlines) {
                        Due::At(due) if due > tokio::time::Instant::now() => {
                            deadline.as_mut().reset(due);
                        }
                        Due::At(_) | Due::Failed => break None,
                        Due::WriteStalled => break Some(Err(Lost::WriteStalled)),
                    }
                }
            }
        }
    };
    match sent {
        Some(Ok(resp)) => Ok((
            resp,
            Lease {
                conn: sending.conn,
                request_body: body_state,
            },
        )),
        Some(Err(e)) => Err(lost(e, &body_state)),
        None => Err(timed_out(deadlines)),
    }
}

/// No response head in time: the upstream's fault (a re-send may help) unless the deadline was
/// the client's own.
fn timed_out(deadlines: &Deadlines) -> UpstreamError {
    let (side, retry) = if deadlines.clients {
        (Side::Client, Retry::Never)
    } else {
        (Side::Upstream, Retry::Resend(RetryReason::Timeout))
    };
    UpstreamError {
        error: RequestError::new(ErrorKind::Timeout)
            .side(side)
            .retry(retry)
            .because(format!(
                "no response head within {:?} of the request body's end",
                deadlines.response
            )),
        outcome: "timeout",
        unsent: None,
    }
}

/// When the wait for the response head is over, looked at again each time it comes.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Not before then.
    At(tokio::time::Instant),
    /// The upstream has left a body it was handed unread for `write`.
    WriteStalled,
    /// The request body failed.
    Failed,
}

/// The whole `response` timeout from the moment the request body ended; while the body is still
/// on its way, looked at again within `response` and within `write` of the upstream's last ask
/// for more, since an upstream that stopped reading it would otherwise hold everything forever.
fn response_due(body: &BodyState, d: &Deadlines) -> Due {
    let now = tokio::time::Instant::now();
    match body.ended.get() {
        Some(ended) => Due::At(*ended + d.response),
        None if body.get() == BODY_OK => match body.upstream_stalled_since() {
            Some(since) if now >= since + d.write => Due::WriteStalled,
            Some(since) => Due::At((since + d.write).min(now + d.response)),
            None => Due::At(now + d.response.min(d.write)),
        },
        None => Due::Failed,
    }
}

/// How a send failed.
enum Lost {
    /// No connection took the request: here it is.
    Unsent(Box<Request<RequestBody>>, crate::error::Cause),
    Failed(crate::error::Cause),
    /// The upstream stopped reading the request body (`timeouts.upstream_write`).
    WriteStalled,
}

/// The error a lost exchange is: the client's when its body broke it, else the upstream's.
fn lost(e: Lost, body: &BodyState) -> UpstreamError {
    match e {
        Lost::Unsent(req, cause) => UpstreamError {
            error: RequestError::new(ErrorKind::UpstreamFailed)
                .retry(Retry::Failover)
                .because(cause),
            outcome: "connect_error",
            unsent: Some(req),
        },
        // Part of the body went: no re-send. The upstream's fault, answered 504 as nginx's
        // proxy_send_timeout; dropping the exchange closes its connection.
        Lost::WriteStalled => UpstreamError {
            error: RequestError::new(ErrorKind::Timeout).because(
                "the upstream stopped reading the request body for timeouts.upstream_write",
            ),
            outcome: "timeout",
            unsent: None,
        },
        Lost::Failed(e) => {
            let error = match body.fault() {
                Some(kind) => RequestError::new(kind),
                None => RequestError::new(ErrorKind::UpstreamFailed)
                    .retry(Retry::Resend(RetryReason::Reset)),
            };
            UpstreamError {
                error: error.because(e),
                outcome: "error",
                unsent: None,
            }
        }
    }
}

/// One exchange's sending: the connection it is on now, and what it may send again.
struct Sending {
    conn: PooledConn,
    /// The request is in HTTP/2 form: only an HTTP/2 connection can take it.
    h2: bool,
    connect: Duration,
    /// A copy of a request whose body has ended, for a re-send after a refusal.
    spare: Option<Request<RequestBody>>,
    refusals: u8,
}

impl Sending {
    async fn run(&mut self, mut req: Request<RequestBody>) -> Result<Response<Incoming>, Lost> {
        loop {
            let mut e = match self.conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            req = match e.take_message() {
                // A pooled connection the upstream closed while it sat idle hands the request
                // back unsent; that one is safe to send again on a fresh connection.
                Some(unsent) if self.conn.reused => {
                    let up = self.conn.upstream().clone();
                    let fresh = Box::pin(up.checkout_fresh(self.connect)).await;
                    self.switch(fresh, unsent)?
                }
                Some(unsent) => return Err(Lost::Unsent(Box::new(unsent), e.into_error().into())),
                None => {
                    let error = e.into_error();
                    let Some(copy) = self.resendable(&error) else {
                        return Err(Lost::Failed(Box::new(error)));
                    };
                    tracing::debug!(upstream = %self.conn.upstream().authority, error = %crate::error::chain(&error), "upstream HTTP/2 stream refused unprocessed: sending it again");
                    let up = self.conn.upstream().clone();
                    let next = up.checkout(self.connect).await;
                    self.switch(next, copy)?
                }
            };
        }
    }

    /// An HTTP/2 upstream may refuse a stream unprocessed: REFUSED_STREAM, or a GOAWAY whose last
    /// stream is below it (nginx sends one every `keepalive_requests`, servers do on shutdown),
    /// and any request sent on that connection until it closes meets the same GOAWAY. A request
    /// whose body is complete goes again on another connection of the same upstream (RFC 9113
    /// 8.7), at most three times: after REFUSED_STREAM whatever its method, after a GOAWAY only
    /// if idempotent (h2 cannot tell a stream beyond the GOAWAY's last one from one it cut short).
    fn resendable(&mut self, error: &hyper::Error) -> Option<Request<RequestBody>> {
        let refusal = unprocessed(error);
        let copy = self.spare.take().filter(|copy| {
            self.refusals < 3
                && match refusal {
                    Some(Refusal::Stream) => true,
                    Some(Refusal::GoAway) => is_idempotent(copy.method()),
                    None => false,
                }
        })?;
        self.refusals += 1;
        if refusal == Some(Refusal::GoAway) {
            self.conn.retire();
        }
        self.spare = Some(head_copy(&copy));
        Some(copy)
    }

    /// The connection the request goes on next, or the request back unsent. It is already in the
    /// first connection's form; one that chose the other protocol by ALPN cannot take it.
    fn switch(
        &mut self,
        conn: Result<PooledConn, DialFailure>,
        req: Request<RequestBody>,
    ) -> Result<Request<RequestBody>, Lost> {
        match conn {
            Ok(c) if c.sender.is_h2() == self.h2 => {
                self.conn = c;
                Ok(req)
            }
            Ok(_) => Err(Lost::Unsent(
                Box::new(req),
                "the upstream changed protocol between connections".into(),
            )),
            Err(e) => Err(Lost::Unsent(Box::new(req), Box::new(e))),
        }
    }
}

/// An HTTP/2 upstream request carries its authority in the URI (`:authority`), not in `Host`,
/// and takes no upgrade.
pub fn to_h2_form(req: &mut Request<RequestBody>, tls: bool) -> Result<(), RequestError> {
    let h = req.headers_mut();
    let host = h.remove(header::HOST);
    h.remove(header::UPGRADE);
    h.remove(header::CONNECTION);
    let authority = host
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| RequestError::new(ErrorKind::BadRequest("malformed request target")))?;
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// A copy of a request whose body has ended (sent again after an HTTP/2 refusal).
fn head_copy(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::whole(Bytes::new(), None));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// How an HTTP/2 upstream turned a stream away before processing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// REFUSED_STREAM: this stream only; the connection goes on.
    Stream,
    /// The upstream's GOAWAY: the connection takes no new stream.
    GoAway,
}

pub fn unprocessed(e: &hyper::Error) -> Option<Refusal> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(Refusal::GoAway);
            }
            return (h2.reason() == Some(h2::Reason::REFUSED_STREAM)).then_some(Refusal::Stream);
        }
        cause = c.source();
    }
    None
}

/// RFC 9110 9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{BODY_DONE, BODY_IDLE};

    fn deadlines(clients: bool) -> Deadlines {
        Deadlines {
            connect: Duration::from_secs(1),
            checkout_by: tokio::time::Instant::now(),
            response: Duration::from_secs(5),
            clients,
            write: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn the_response_wait_runs_from_the_end_of_the_body() {
        let d = deadlines(false);
        let soon = |due: Due| match due {
            Due::At(at) => at.saturating_duration_since(tokio::time::Instant::now()),
            other => panic!("{other:?}"),
        };
        // Still arriving, the upstream asking for more: looked at again within `write`.
        let streaming = BodyState::default();
        assert!(soon(response_due(&streaming, &d)) <= d.write);
        let ended = BodyState::default();
        ended.set(BODY_DONE);
        assert_eq!(
            response_due(&ended, &d),
            Due::At(*ended.ended.get().unwrap() + d.response)
        );
        let broken = BodyState::default();
        broken.set(BODY_IDLE);
        assert_eq!(response_due(&broken, &d), Due::Failed);
    }

    #[tokio::test]
    async fn an_upstream_that_leaves_a_handed_body_unread_for_write_is_stalled() {
        let d = deadlines(false);
        let body = BodyState::default();
        body.note_handed();
        assert!(matches!(response_due(&body, &d), Due::At(_)));
        let quick = Deadlines {
            write: Duration::ZERO,
            ..d
        };
        assert_eq!(response_due(&body, &quick), Due::WriteStalled);
        // It asked for more: not stalled, whatever `write` is.
        body.note_asked();
        assert!(matches!(response_due(&body, &quick), Due::At(_)));
        let e = lost(Lost::WriteStalled, &body);
        assert_eq!(e.error.kind, ErrorKind::Timeout);
        assert_eq!(e.error.retry, Retry::Never, "part of the body went");
        assert_eq!(e.outcome, "timeout");
    }

    #[test]
    fn a_timeout_is_the_upstreams_unless_the_deadline_was_the_clients() {
        let e = timed_out(&deadlines(false));
        assert_eq!(e.error.kind, ErrorKind::Timeout);
        assert_eq!(e.error.retry, Retry::Resend(RetryReason::Timeout));
        assert!(e.error.blames_upstream());
        let e = timed_out(&deadlines(true));
        assert_eq!(e.error.side, Side::Client);
        assert_eq!(e.error.retry, Retry::Never);
        assert!(!e.error.blames_upstream());
    }

    #[test]
    fn a_broken_exchange_is_the_clients_when_its_body_broke_it() {
        let body = BodyState::default();
        let e = lost(Lost::Failed("connection reset".into()), &body);
        assert_eq!(e.error.kind, ErrorKind::UpstreamFailed);
        assert_eq!(e.error.retry, Retry::Resend(RetryReason::Reset));
        assert!(e.unsent.is_none());
        body.set(BODY_IDLE);
        let e = lost(Lost::Failed("connection reset".into()), &body);
        assert_eq!(e.error.kind, ErrorKind::BodyIdle);
        assert_eq!(e.error.side, Side::Client);
        assert_eq!(e.error.retry, Retry::Never);
        let unsent = Request::new(RequestBody::whole(Bytes::new(), None));
        let e = lost(Lost::Unsent(Box::new(unsent), "closed".into()), &body);
        assert_eq!(e.error.retry, Retry::Failover);
        assert!(e.unsent.is_some(), "the request comes back to go elsewhere");
    }

    #[test]
    fn dial_failures_fail_over_except_limens_own_budget() {
        let a = || "a:1".to_string();
        for (failure, outcome, kind, retry) in [
            (
                DialFailure::Timeout(a()),
                "connect_error",
                ErrorKind::NoUpstream,
                Retry::Failover,
            ),
            (
                DialFailure::Tls(a(), "bad".into()),
                "tls_error",
                ErrorKind::NoUpstream,
                Retry::Failover,
            ),
            (
                DialFailure::Shared(Arc::new(DialFailure::Tls(a(), "bad".into()))),
                "tls_error",
                ErrorKind::NoUpstream,
                Retry::Failover,
            ),
            (
                DialFailure::TooManyWaiting(9, a()),
                "connect_error",
                ErrorKind::NoUpstream,
                Retry::Failover,
            ),
            (
                DialFailure::Exhausted(a()),
                "connect_error",
                ErrorKind::Overloaded,
                Retry::Never,
            ),
        ] {
            let (got, error) = failure.classify();
            assert_eq!((got, error.kind, error.retry), (outcome, kind, retry));
        }
    }

    #[test]
    fn an_h2_request_carries_its_authority_and_no_upgrade() {
        let mut req = Request::new(RequestBody::whole(Bytes::new(), None));
        *req.uri_mut() = "/p?q=1".parse().unwrap();
        let h = req.headers_mut();
        h.insert(header::HOST, "app.test".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::CONNECTION, "upgrade".parse().unwrap());
        to_h2_form(&mut req, true).unwrap();
        assert_eq!(req.uri(), "https://app.test/p?q=1");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().is_empty());
        assert!(is_idempotent(&Method::PUT) && !is_idempotent(&Method::POST));
    }
}
