//! One try on one connection: the request sent (again on a fresh connection when a pooled one
//! closed before taking it, again after an HTTP/2 refusal) and its response head awaited under the
//! route's timeout.
//!
//! Owns: one exchange with one upstream. Must not touch: which upstream (the forward stage picks).

#[allow(unused_imports)]
use super::*;

/// An HTTP/2 upstream request carries its authority in the URI (`:authority`), not in `Host`,
/// and takes no upgrade.
pub(super) fn to_h2_form(req: &mut Request<RequestBody>, tls: bool) -> Result<(), ProxyError> {
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
        .map_err(|_| ProxyError::BadRequest("malformed request target"))?;
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// One try on one connection: the request sent (again on a fresh connection if the pooled one
/// was closed before it took it) and its response head awaited. A request that no connection
/// took comes back in the failure, as a connect failure: it may go to another upstream whatever
/// its method, since no upstream saw it.
pub(super) async fn exchange(
    mut up_req: Request<RequestBody>,
    mut pooled: PooledConn,
    route: &Route,
    timeout: Duration,
    cfg: &Config,
    shared: &Shared,
) -> Result<(Response<Incoming>, PooledConn), TryFailure> {
    use crate::config::RetryReason;
    let body_state = up_req.body().state.clone();
    let h2_form = pooled.sender.is_h2();
    if up_req.version() == Version::HTTP_2 && !h2_form {
        // Already in HTTP/2 form from an earlier try; this upstream speaks HTTP/1.1.
        return Err(TryFailure::new(ProxyError::UpstreamFailed, None));
    }
    if h2_form && up_req.version() != Version::HTTP_2 {
        let tls = pooled.upstream().scheme == crate::config::UpstreamScheme::Https;
        to_h2_form(&mut up_req, tls).map_err(|error| TryFailure::new(error, None))?;
    }

    // An HTTP/2 upstream may refuse a stream unprocessed: REFUSED_STREAM, or a GOAWAY whose last
    // stream is below it (nginx sends one every `keepalive_requests`, servers do on shutdown),
    // and any request sent on that connection until it closes meets the same GOAWAY. A request
    // whose body is complete is kept as a copy and sent again on another connection of the same
    // upstream (RFC 9113 8.7): after REFUSED_STREAM whatever its method, after a GOAWAY only if
    // idempotent (h2 cannot tell a stream beyond the GOAWAY's last one from one it cut short).
    let mut spare = (h2_form && up_req.body().is_end_stream()).then(|| head_copy(&up_req));
    let mut refusals = 0u8;

    enum Lost {
        /// No connection took the request: here it is.
        Unsent(Box<Request<RequestBody>>, String),
        Failed(String),
    }
    /// The connection a request goes on to, or the request back unsent. It is already in the
    /// first connection's form; one that chose the other protocol by ALPN cannot take it.
    fn in_same_form(
        conn: Result<PooledConn, crate::upstream::ConnectError>,
        h2_form: bool,
        req: Request<RequestBody>,
    ) -> Result<(PooledConn, Request<RequestBody>), Lost> {
        match conn {
            Ok(c) if c.sender.is_h2() == h2_form => Ok((c, req)),
            Ok(_) => Err(Lost::Unsent(
                Box::new(req),
                "the upstream changed protocol between connections".into(),
            )),
            Err(ce) => Err(Lost::Unsent(Box::new(req), ce.to_string())),
        }
    }
    let exchange = async {
        loop {
            match pooled.sender.try_send_request(up_req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // A pooled connection the upstream closed while it sat idle hands the request
                    // back unsent; that one is safe to send again on a fresh connection.
                    Some(req) if pooled.reused => {
                        let up = pooled.upstream().clone();
                        let fresh = Box::pin(up.checkout_fresh(cfg.timeouts.upstream_connect));
                        (pooled, up_req) = in_same_form(fresh.await, h2_form, req)?;
                    }
                    Some(req) => {
                        return Err(Lost::Unsent(Box::new(req), error_chain(&e.into_error())))
                    }
                    None => {
                        let error = e.into_error();
                        let refusal = unprocessed(&error);
                        let resend = spare.take().filter(|copy| {
                            refusals < 3
                                && match refusal {
                                    Some(Refusal::Stream) => true,
                                    Some(Refusal::GoAway) => is_idempotent(copy.method()),
                                    None => false,
                                }
                        });
                        let Some(copy) = resend else {
                            return Err(Lost::Failed(error_chain(&error)));
                        };
                        refusals += 1;
                        if refusal == Some(Refusal::GoAway) {
                            pooled.retire();
                        }
                        tracing::debug!(upstream = %pooled.upstream().authority, error = %error_chain(&error), "upstream HTTP/2 stream refused unprocessed: sending it again");
                        let up = pooled.upstream().clone();
                        spare = Some(head_copy(&copy));
                        let next = up.checkout(cfg.timeouts.upstream_connect).await;
                        (pooled, up_req) = in_same_form(next, h2_form, copy)?;
                    }
                },
            }
        }
    };
    let sent = {
        tokio::pin!(exchange);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = &mut exchange => break Ok(r),
                () = &mut deadline => {
                    // The upstream gets the whole timeout from the moment the body ended.
                    let due = match body_state.ended.get() {
                        Some(ended) => *ended + timeout,
                        None if body_state.get() == BODY_OK => {
                            tokio::time::Instant::now() + timeout
                        }
                        None => break Err(()),
                    };
                    if due > tokio::time::Instant::now() {
                        deadline.as_mut().reset(due);
                        continue;
                    }
                    break Err(());
                }
            }
        }
    };
    let authority = pooled.upstream().authority.clone();
    match sent {
        Ok(Ok(resp)) => {
            count_upstream(shared, &authority, "ok");
            Ok((resp, pooled))
        }
        Ok(Err(Lost::Unsent(req, e))) => {
            count_upstream(shared, &authority, "connect_error");
            tracing::warn!(route = %route.label, upstream = %authority, error = %e, "upstream connection closed before it took the request");
            Err(TryFailure {
                error: ProxyError::UpstreamFailed,
                reason: Some(RetryReason::ConnectFailure),
                unsent: Some(*req),
            })
        }
        Ok(Err(Lost::Failed(e))) => {
            count_upstream(shared, &authority, "error");
            if let Some(fault) = body_fault(&body_state) {
                return Err(TryFailure::new(fault, None));
            }
            tracing::warn!(route = %route.label, upstream = %authority, error = %e, "upstream exchange failed");
            Err(TryFailure::new(
                ProxyError::UpstreamFailed,
                Some(RetryReason::Reset),
            ))
        }
        Err(()) => {
            count_upstream(shared, &authority, "timeout");
            tracing::warn!(route = %route.label, upstream = %authority, ?timeout, "upstream did not answer in time");
            Err(TryFailure::new(
                ProxyError::Timeout,
                Some(RetryReason::Timeout),
            ))
        }
    }
}

/// A copy of a request whose body has ended (sent again after an HTTP/2 refusal).
pub(super) fn head_copy(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::whole(Bytes::new(), None));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// How an HTTP/2 upstream turned a stream away before processing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// REFUSED_STREAM: this stream only; the connection goes on.
    Stream,
    /// The upstream's GOAWAY: the connection takes no new stream.
    GoAway,
}

pub(super) fn unprocessed(e: &hyper::Error) -> Option<Refusal> {
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
pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An error with its causes (hyper's own message is only "http2 error"), for the log.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
