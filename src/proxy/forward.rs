//! Stage 3, forward: an upstream picked for each try, failover for a request no upstream took
//! (never a retry, no budget), re-sends within `retry.attempts` and the budget for one that may
//! have been processed, and the deadline every checkout is bounded by.
//!
//! Owns: the policy across upstreams. Must not touch: the exchange on one connection (`exchange`).

#[allow(unused_imports)]
use super::*;

pub(super) fn count_upstream(shared: &Shared, upstream: &Arc<str>, result: &'static str) {
    shared
        .metrics
        .upstream_requests
        .get_or_create(&crate::metrics::UpstreamLabels {
            upstream: upstream.clone(),
            result,
        })
        .inc();
}

/// A request body a later try may send again is read whole first, up to this size.
pub const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// Whether a request may be sent again after a try that reached the upstream: an idempotent
/// method, no upgrade, not gRPC, and a body that is empty or small enough to keep whole.
pub(super) fn replayable(
    method: &Method,
    headers: &HeaderMap,
    body_done: bool,
    upgrade: bool,
    grpc: bool,
) -> bool {
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    let small = body_done
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    idempotent && small && !upgrade && !grpc
}

/// The body of each try: the client's stream (sent once), or a copy kept whole.
pub(super) enum TryBody {
    Stream(Option<RequestBody>),
    Whole(Bytes, Option<HeaderMap>),
}

impl TryBody {
    pub(super) fn next(&mut self) -> Option<RequestBody> {
        match self {
            TryBody::Stream(b) => b.take(),
            TryBody::Whole(d, t) => Some(RequestBody::whole(d.clone(), t.clone())),
        }
    }
}

/// How one try ended, when it gave no response to relay.
pub(super) struct TryFailure {
    pub(super) error: ProxyError,
    /// The `retry.on` reason, when the failure is one (a limen-side refusal is not).
    pub(super) reason: Option<crate::config::RetryReason>,
    /// The request, when no upstream took it: the next try sends it as it is.
    pub(super) unsent: Option<Request<RequestBody>>,
}

impl TryFailure {
    pub(super) fn new(error: ProxyError, reason: Option<crate::config::RetryReason>) -> TryFailure {
        TryFailure {
            error,
            reason,
            unsent: None,
        }
    }
}

/// Stage 3: an upstream chosen for each try (by the route's balancing, skipping ones that are
/// down or ejected), the request sent (again on a fresh connection if a pooled one turned out
/// closed before it took the request), and the response head awaited under the route's timeout,
/// which runs from the end of the request body. A try that fails in a way `retry.on` names is
/// followed by one on another upstream, within `retry.attempts` and the route's budget; after the
/// request reached an upstream, only when `replay` allows it.
pub(super) async fn forward(
    prepared: Prepared,
    body: RequestBody,
    plan: &Plan<'_>,
    log: &mut AccessLog,
) -> Result<Answered, ProxyError> {
    let Plan {
        route,
        group,
        cfg,
        timeout,
        replay,
        ..
    } = *plan;
    use crate::config::RetryReason;
    let shared = log.shared.clone();
    route.budget.note_request();
    let retry = route.retry;
    let replay = replay && retry.attempts > 0 && retry.on.after_sending();
    let mut source = if replay {
        let state = body.state.clone();
        // Boxed, as every rare path of the request's future: see `Upstream::checkout`.
        match Box::pin(body.read_whole(RETRY_BUFFER_LIMIT as usize)).await {
            Some((data, trailers)) => TryBody::Whole(data, trailers),
            None => return Err(body_fault(&state).unwrap_or(ProxyError::BodyAborted)),
        }
    } else {
        TryBody::Stream(Some(body))
    };
    // A deadline shorter than the route's is the client's (grpc-timeout): running out of it says
    // nothing about the upstream.
    let clients_deadline = timeout < route.timeout;
    let mut prepared = Some(prepared);
    // A request no upstream took (its connection closed before it was sent) goes as it is.
    let mut unsent: Option<Request<RequestBody>> = None;
    let mut tried = [0usize; 12];
    let mut tries = 0usize;
    // Re-sends of a request an upstream may have processed: bounded by `retry.attempts` and the
    // budget. A request no upstream took is not retried but failed over, within the route's
    // upstreams plus `attempts`, whatever `retry` says and without spending the budget.
    let mut retries = 0usize;
    let max_tries = retry.attempts as usize + group.members().len();
    // Every try's checkout is bounded by the request's deadline, so a black-holed upstream costs
    // a request about max(timeout, upstream_connect), however many tries it takes.
    let deadline = tokio::time::Instant::now() + timeout.max(cfg.timeouts.upstream_connect);
    let mut first_error: Option<ProxyError> = None;
    loop {
        let pick = group.pick(&tried[..tries]).ok_or(ProxyError::NoUpstream)?;
        match pick.all_down_changed {
            Some(true) => {
                tracing::warn!(route = %route.label, "every upstream of the route is down or ejected: spreading requests over all of them (fail open)")
            }
            Some(false) => {
                tracing::info!(route = %route.label, "the route has an upstream that is up again")
            }
            None => {}
        }
        tried[tries.min(tried.len() - 1)] = pick.index;
        tries += 1;
        let up = pick.upstream.clone();
        let in_flight = up.start_request();
        let last_chance = retries >= retry.attempts as usize;
        // A pooled connection ready now needs no timer; only a wait is bounded by the deadline.
        let checkout = match up.checkout_now() {
            Some(pooled) => Ok(Ok(pooled)),
            None => {
                tokio::time::timeout_at(deadline, up.checkout(cfg.timeouts.upstream_connect)).await
            }
        };
        let outcome = match checkout {
            Err(_) => {
                count_upstream(&shared, &up.authority, "connect_error");
                tracing::warn!(route = %route.label, upstream = %up.authority, "no upstream connection within the request's deadline");
                return Err(first_error.unwrap_or(ProxyError::Timeout));
            }
            Ok(Err(e)) => Err(connect_failure(&shared, route, &up, e)),
            Ok(Ok(pooled)) => {
                let req = unsent.take().or_else(|| {
                    // The head for this try; kept for the next one when a re-send may follow.
                    let head = if replay && !last_chance {
                        prepared.clone()
                    } else {
                        prepared.take()
                    };
                    Some(head?.into_request(source.next()?))
                });
                match req {
                    Some(req) => exchange(req, pooled, route, timeout, cfg, &shared).await,
                    None => Err(TryFailure::new(ProxyError::UpstreamFailed, None)),
                }
            }
        };
        log.upstream = Some(up.authority.clone());
        let mut failure = match outcome {
            Ok((resp, pooled)) => {
                let status = resp.status().as_u16();
                match RetryReason::of_status(status) {
                    None => {
                        up.health.passive_success();
                        return Ok(Answered {
                            resp,
                            pooled,
                            in_flight,
                        });
                    }
                    Some(reason) => {
                        passive_failure(&shared, &up);
                        if !(replay && retry.on.has(reason) && !last_chance) {
                            return Ok(Answered {
                                resp,
                                pooled,
                                in_flight,
                            });
                        }
                        if !route.budget.try_retry() {
                            budget_exhausted(&shared, route);
                            return Ok(Answered {
                                resp,
                                pooled,
                                in_flight,
                            });
                        }
                        retries += 1;
                        TryFailure::new(ProxyError::UpstreamFailed, Some(reason))
                    }
                }
            }
            Err(mut f) => {
                if f.reason == Some(RetryReason::Timeout) && clients_deadline {
                    f.reason = None;
                }
                // Not the upstream's doing (the client's body or deadline, limen's own limits):
                // no retry, and the client hears the real cause.
                let Some(reason) = f.reason else {
                    return Err(f.error);
                };
                passive_failure(&shared, &up);
                if reason == RetryReason::ConnectFailure {
                    // Failover: nothing reached an upstream.
                    if tries >= max_tries || tokio::time::Instant::now() >= deadline {
                        return Err(first_error.unwrap_or(f.error));
                    }
                } else {
                    if !retry.on.has(reason) || last_chance || !replay {
                        return Err(first_error.unwrap_or(f.error));
                    }
                    if !route.budget.try_retry() {
                        budget_exhausted(&shared, route);
                        return Err(first_error.unwrap_or(f.error));
                    }
                    retries += 1;
                }
                f
            }
        };
        if let Some(reason) = failure.reason {
            shared
                .metrics
                .retries
                .get_or_create(&crate::metrics::RetryLabels {
                    route: route.label.clone(),
                    reason: reason.as_str(),
                })
                .inc();
            tracing::debug!(route = %route.label, upstream = %up.authority, reason = reason.as_str(), "trying the request again on another upstream");
        }
        unsent = failure.unsent.take();
        first_error.get_or_insert(failure.error);
    }
}

pub(super) fn budget_exhausted(shared: &Shared, route: &Route) {
    shared
        .metrics
        .retry_budget_exhausted
        .get_or_create(&crate::metrics::RouteLabel {
            route: route.label.clone(),
        })
        .inc();
}

/// Live traffic says the upstream failed; it may be ejected for it.
pub(super) fn passive_failure(shared: &Shared, up: &Arc<crate::upstream::Upstream>) {
    if let Some(ejection) = up.health.passive_failure(std::time::Instant::now()) {
        shared
            .metrics
            .ejections
            .get_or_create(&crate::metrics::UpstreamLabel {
                upstream: up.authority.clone(),
            })
            .inc();
        tracing::warn!(upstream = %up.url, ?ejection, failures = up.health.passive.consecutive_failures, "upstream ejected: too many failures in a row (passive outlier detection)");
    }
}

pub(super) fn connect_failure(
    shared: &Shared,
    route: &Route,
    up: &crate::upstream::Upstream,
    e: crate::upstream::ConnectError,
) -> TryFailure {
    use crate::upstream::ConnectError;
    let (result, failure) = match e.root() {
        // limen's own descriptor budget, not the upstream's fault: no retry, no ejection.
        ConnectError::Exhausted(_) => (
            "connect_error",
            TryFailure::new(ProxyError::Overloaded, None),
        ),
        ConnectError::Tls(..) => ("tls_error", connect_failed()),
        _ => ("connect_error", connect_failed()),
    };
    count_upstream(shared, &up.authority, result);
    tracing::warn!(route = %route.label, error = %e, "upstream unreachable");
    failure
}

pub(super) fn connect_failed() -> TryFailure {
    TryFailure::new(
        ProxyError::NoUpstream,
        Some(crate::config::RetryReason::ConnectFailure),
    )
}
