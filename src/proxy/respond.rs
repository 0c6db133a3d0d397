//! Stage 4, respond: the upstream's head checked and relayed (framing, hop-by-hop, route headers),
//! its body watched by the body guards.
//!
//! Owns: what reaches the client from the upstream. Must not touch: retries (decided before any
//! byte is sent).

#[allow(unused_imports)]
use super::*;

/// Stage 4: the upstream's response checked and relayed: a 101 only for an upgrade the client
/// asked for, framing checked like a client's, hop-by-hop headers gone, the body streamed with
/// the connection returned to its pool when both bodies end cleanly.
pub(super) fn respond(
    answered: Answered,
    client_upgrade: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
    plan: &Plan<'_>,
    conn: &Arc<ConnInfo>,
    shared: &Shared,
) -> Result<Response<ResponseBody>, RequestError> {
    let Answered {
        resp: mut up_resp,
        lease,
        in_flight,
    } = answered;
    let Plan {
        route,
        cfg,
        streaming,
        ..
    } = *plan;
    let authority = lease.upstream().authority.clone();
    let refuse = |why: &'static str| {
        count_upstream(shared, &authority, "invalid_response");
        tracing::warn!(route = %route.label, upstream = %authority, "upstream response refused: {why}");
        RequestError::new(ErrorKind::BadUpstreamResponse).because(why)
    };
    if up_resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some((client_upgrade, offered)) = client_upgrade else {
            return Err(refuse(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        };
        if !upgrade_agreed(up_resp.headers(), &offered) {
            return Err(refuse("101 names a protocol the client did not offer"));
        }
        return Ok(tunnel(
            up_resp,
            client_upgrade,
            route,
            conn.clone(),
            &cfg.timeouts,
        ));
    }
    if up_resp.version() == Version::HTTP_2 && crate::headers::padded_value(up_resp.headers()) {
        return Err(refuse(
            "a header field value starts or ends with whitespace (RFC 9113 8.2.1)",
        ));
    }
    let reusable = match relayed_response_headers(up_resp.headers_mut()) {
        Ok(r) => r,
        Err(why) => return Err(refuse(why)),
    };
    let (coding, varies) = match (&route.compress, plan.negotiated) {
        (Some(c), Some(client)) => compression(c, client, &mut up_resp, route, shared),
        _ => (None, false),
    };
    let (parts, body) = up_resp.into_parts();
    let mut resp = Response::from_parts(
        parts,
        ResponseBody {
            inner: Inner::Upstream {
                body,
                conn: reusable.then_some(lease),
                _in_flight: in_flight,
                stall: None,
                // A gRPC stream's messages may be far apart: `idle` governs it, not `body_idle`.
                body_idle: if streaming {
                    cfg.timeouts.idle
                } else {
                    cfg.timeouts.body_idle
                },
                moved: false,
            },
            log: None,
            stream: None,
            rest: Bytes::new(),
            coding,
            varies,
        },
    );
    *resp.version_mut() = Version::HTTP_11;
    Ok(resp)
}

/// A route's `compress` applied to one response head: the encoder to run the body through, if
/// any, and whether the answer varies on `Accept-Encoding` (the route's own response edits run
/// after this, so `handle` puts `Vary` back if they replaced it).
fn compression(
    c: &crate::config::Compress,
    client: compress::Negotiated,
    up_resp: &mut Response<Incoming>,
    route: &Route,
    shared: &Shared,
) -> (Option<Box<Coding>>, bool) {
    if up_resp.status() == StatusCode::NOT_MODIFIED {
        return (None, compress::not_modified(client, up_resp.headers_mut()));
    }
    match compress::decide(c, client, up_resp.status(), up_resp.headers()) {
        compress::Decision::Untouched => (None, false),
        compress::Decision::VaryOnly => {
            compress::add_vary(up_resp.headers_mut());
            (None, true)
        }
        // The head a GET would get, and no encoder: there is no body to code.
        compress::Decision::Compress(alg) if client.head => {
            compress::code_head(up_resp.headers_mut(), alg);
            (None, true)
        }
        compress::Decision::Compress(alg) => {
            let streamed = !up_resp.headers().contains_key(header::CONTENT_LENGTH);
            match Coding::new(alg, streamed, &shared.metrics) {
                Ok(coding) => {
                    compress::code_head(up_resp.headers_mut(), alg);
                    (Some(Box::new(coding)), true)
                }
                Err(e) => {
                    // Relayed as it is (the client accepts identity unless it said not to):
                    // too many coded streams, or an encoder that could not start, is limen's
                    // limit, not the response's fault.
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(route = %route.label, error = %e, "response encoder not started; relayed uncompressed");
                    }
                    compress::add_vary(up_resp.headers_mut());
                    (None, true)
                }
            }
        }
    }
}
