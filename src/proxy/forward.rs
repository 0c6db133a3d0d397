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

/// Stage 3: an upstream chosen for each try (by the route's balancing, skipping ones that are
/// down or ejected) and the exchange left to the upstream client. A request no upstream took
/// fails over to the next untried upstream, within the route's upstreams plus `retry.attempts`
/// and without spending the budget. One an upstream may have processed is sent again only when
/// `retry.on` names what happened, `replay` allows it, and within `retry.attempts` and the budget.
pub(super) async fn forward(
    prepared: Prepared,
    body: RequestBody,
    plan: &Plan<'_>,
    log: &mut AccessLog,
) -> Result<Answered, RequestError> {
    let Plan {
        route,
        group,
        cfg,
        timeout,
        replay,
        ..
    } = *plan;
    let shared = log.shared.clone();
    route.budget.note_request();
    let replay = replay && route.retry.attempts > 0 && route.retry.on.after_sending();
    let mut source = if replay {
        let state = body.state.clone();
        // Boxed, as every rare path of the request's future: see `Upstream::checkout`.
        match Box::pin(body.read_whole(RETRY_BUFFER_LIMIT as usize)).await {
            Some((data, trailers)) => TryBody::Whole(data, trailers),
            None => return Err(state.fault().unwrap_or(ErrorKind::BodyAborted).into()),
        }
    } else {
        TryBody::Stream(Some(body))
    };
    let connect = cfg.timeouts.upstream_connect;
    let deadlines = crate::upstream::Deadlines {
        connect,
        // Every checkout is bounded by the request's deadline, so a black-holed upstream costs
        // a request about max(timeout, upstream_connect), however many tries it takes.
        checkout_by: tokio::time::Instant::now() + timeout.max(connect),
        response: timeout,
        // A deadline shorter than the route's is the client's (grpc-timeout): running out of it
        // says nothing about the upstream.
        clients: timeout < route.timeout,
        write: cfg.timeouts.upstream_write,
    };
    let mut tries = Tries::new(route, group.members().len(), replay, deadlines.checkout_by);
    let mut prepared = Some(prepared);
    // A request no upstream took comes back from the client, and goes as it is.
    let mut unsent: Option<Request<RequestBody>> = None;
    loop {
        let up = tries.pick(group)?;
        let in_flight = up.start_request();
        let req = unsent.take().or_else(|| {
            // The head for this try; kept for the next one when a re-send may follow.
            let head = if replay && !tries.last_chance() {
                prepared.clone()
            } else {
                prepared.take()
            };
            Some(head?.into_request(source.next()?))
        });
        let Some(req) = req else {
            return Err(tries.give_up(RequestError::new(ErrorKind::UpstreamFailed)));
        };
        let outcome = crate::upstream::send(&up, req, &deadlines).await;
        log.upstream = Some(up.authority.clone());
        let error = match outcome {
            Ok((resp, lease)) => {
                count_upstream(&shared, &up.authority, "ok");
                let answered = Answered {
                    resp,
                    lease,
                    in_flight,
                };
                match tries.judge_response(answered, &shared, &up) {
                    Ok(answered) => return Ok(answered),
                    Err(error) => error,
                }
            }
            Err(failed) => {
                count_upstream(&shared, &up.authority, failed.outcome);
                log_failure(route, &up, &failed.error);
                unsent = failed.unsent.map(|r| *r);
                tries.judge_failure(failed.error, &shared, &up)?
            }
        };
        tries.note_retry(&shared, &up, error);
    }
}

/// What the tries of one request have done so far, and the rules for the next.
struct Tries<'a> {
    route: &'a Route,
    replay: bool,
    checkout_by: tokio::time::Instant,
    tried: [usize; 12],
    count: usize,
    /// Re-sends of a request an upstream may have processed (bounded by `retry.attempts` and
    /// the budget); failovers are not counted here.
    retries: usize,
    /// Tries in all: every upstream once, plus `retry.attempts`.
    max: usize,
    /// The first try's failure: what the client hears if no try succeeds.
    first_error: Option<RequestError>,
}

impl<'a> Tries<'a> {
    fn new(
        route: &'a Route,
        upstreams: usize,
        replay: bool,
        checkout_by: tokio::time::Instant,
    ) -> Tries<'a> {
        Tries {
            route,
            replay,
            checkout_by,
            tried: [0; 12],
            count: 0,
            retries: 0,
            max: route.retry.attempts as usize + upstreams,
            first_error: None,
        }
    }

    fn last_chance(&self) -> bool {
        self.retries >= self.route.retry.attempts as usize
    }

    /// The next upstream: one not tried yet when there is one.
    fn pick(
        &mut self,
        group: &crate::upstream::Group,
    ) -> Result<Arc<crate::upstream::Upstream>, RequestError> {
        let pick = group
            .pick(&self.tried[..self.count])
            .ok_or(ErrorKind::NoUpstream)?;
        match pick.all_down_changed {
            Some(true) => {
                tracing::warn!(route = %self.route.label, "every upstream of the route is down or ejected: spreading requests over all of them (fail open)")
            }
            Some(false) => {
                tracing::info!(route = %self.route.label, "the route has an upstream that is up again")
            }
            None => {}
        }
        self.tried[self.count.min(self.tried.len() - 1)] = pick.index;
        self.count += 1;
        Ok(pick.upstream.clone())
    }

    /// What the client hears when no try is left: the first try's failure.
    fn give_up(&mut self, last: RequestError) -> RequestError {
        self.first_error.take().unwrap_or(last)
    }

    /// A response to relay, or (a status `retry.on` names, with a re-send allowed) the error
    /// that makes the next try.
    fn judge_response(
        &mut self,
        answered: Answered,
        shared: &Shared,
        up: &Arc<crate::upstream::Upstream>,
    ) -> Result<Answered, RequestError> {
        let status = answered.resp.status().as_u16();
        let Some(reason) = crate::config::RetryReason::of_status(status) else {
            up.health.passive_success();
            return Ok(answered);
        };
        passive_failure(shared, up);
        if !(self.replay && self.route.retry.on.has(reason) && !self.last_chance()) {
            return Ok(answered);
        }
        if !self.route.budget.try_retry() {
            budget_exhausted(shared, self.route);
            return Ok(answered);
        }
        self.retries += 1;
        Err(RequestError::new(ErrorKind::UpstreamFailed)
            .retry(Retry::Resend(reason))
            .because(format!("the upstream answered {status}")))
    }

    /// The error back when the request may go to another upstream; else the error the client
    /// hears.
    fn judge_failure(
        &mut self,
        error: RequestError,
        shared: &Shared,
        up: &Arc<crate::upstream::Upstream>,
    ) -> Result<RequestError, RequestError> {
        if error.blames_upstream() {
            passive_failure(shared, up);
        }
        let retry = self.route.retry;
        match error.retry {
            // Not the upstream's doing (the client's body or deadline, limen's own limits): the
            // client hears the real cause.
            Retry::Never if error.side != Side::Upstream => Err(error),
            Retry::Never => Err(self.give_up(error)),
            // Failover: nothing reached an upstream.
            Retry::Failover => {
                if self.count >= self.max || tokio::time::Instant::now() >= self.checkout_by {
                    return Err(self.give_up(error));
                }
                Ok(error)
            }
            Retry::Resend(reason) => {
                if !retry.on.has(reason) || self.last_chance() || !self.replay {
                    return Err(self.give_up(error));
                }
                if !self.route.budget.try_retry() {
                    budget_exhausted(shared, self.route);
                    return Err(self.give_up(error));
                }
                self.retries += 1;
                Ok(error)
            }
        }
    }

    /// The next try is on its way: counted by its reason, and the first failure kept.
    fn note_retry(&mut self, shared: &Shared, up: &crate::upstream::Upstream, error: RequestError) {
        // `judge_failure` lets only Failover and Resend through; a failover is counted as the
        // `connect_failure` reason, as `retry.on` names it.
        let reason = match error.retry {
            Retry::Resend(reason) => reason,
            Retry::Failover | Retry::Never => crate::config::RetryReason::ConnectFailure,
        };
        shared
            .metrics
            .retries
            .get_or_create(&crate::metrics::RetryLabels {
                route: self.route.label.clone(),
                reason: reason.as_str(),
            })
            .inc();
        tracing::debug!(route = %self.route.label, upstream = %up.authority, reason = reason.as_str(), "trying the request again on another upstream");
        self.first_error.get_or_insert(error);
    }
}

/// A failed try, in the log: the upstream's failures as warnings, the client's as debug.
fn log_failure(route: &Route, up: &crate::upstream::Upstream, error: &RequestError) {
    let cause = error.chain();
    match error.side {
        Side::Client => {
            tracing::debug!(route = %route.label, upstream = %up.authority, error = %cause, "the client's request failed on its way to the upstream")
        }
        Side::Upstream | Side::Limen => {
            tracing::warn!(route = %route.label, upstream = %up.authority, error = %cause, "upstream try failed")
        }
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
