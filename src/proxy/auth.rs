//! Stage 1c, auth: the route's `auth`, after its access lists and rate limit and before any
//! body is read. `basic`: 401 with the route's challenge, the verified user upstream in
//! `X-Forwarded-User`, never the credential. `forward`: the auth service is asked through the
//! upstream client; a 2xx lets the request on with the service's `response_headers`, any other
//! answer goes back to the client as it came, and no answer is a 503 (fail closed).
//!
//! Owns: asking, the verdict's mapping to an answer and its count. Must not touch: hashing
//! (`crate::auth` bounds it), the upstream request beyond the fields auth decides.

#[allow(unused_imports)]
use super::*;

use crate::auth::Basic;
use crate::metrics::AuthLabels;
use crate::routing::{ForwardRoute, RouteAuth};
use crate::upstream::Deadlines;

/// The largest body of an auth service's refusal relayed to the client; a longer one is
/// answered with its status and headers and no body.
pub const FORWARD_AUTH_BODY_MAX: usize = 64 * 1024;

/// The fields of an auth service's refusal the client gets.
const RELAYED: [HeaderName; 5] = [
    header::WWW_AUTHENTICATE,
    header::LOCATION,
    header::SET_COOKIE,
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
];

/// What auth lets through with the request.
pub(super) enum Authorized {
    /// A basic-auth user, named upstream.
    User(String),
    /// A forward-auth service's `response_headers`, copied upstream.
    Fields(HeaderMap),
}

/// Why auth stopped the request.
pub(super) enum Refused {
    Kind(ErrorKind),
    /// The auth service's own answer, relayed.
    Answer(Box<Response<ResponseBody>>),
}

/// What the auth service hears about the request.
pub(super) struct Asking<'a> {
    pub(super) method: &'a Method,
    /// The request-target as received.
    pub(super) uri: &'a Uri,
    pub(super) host: &'a str,
    pub(super) client: IpAddr,
    pub(super) headers: &'a HeaderMap,
}

/// The route's auth: what goes on with the request, or the refusal.
pub(super) async fn authorize(
    auth: &RouteAuth,
    route: &Route,
    asking: &Asking<'_>,
    cfg: &Config,
    metrics: &crate::metrics::Metrics,
) -> Result<Authorized, Refused> {
    let count = |result: &'static str| {
        metrics
            .auth_requests
            .get_or_create(&AuthLabels {
                route: route.label.clone(),
                result,
            })
            .inc();
    };
    match auth {
        RouteAuth::Basic(None) => {
            count("denied");
            Err(Refused::Kind(ErrorKind::Unauthorized))
        }
        RouteAuth::Basic(Some(users)) => {
            match crate::auth::check_basic(users, asking.headers.get(header::AUTHORIZATION)).await {
                Basic::Allowed(user) => {
                    count("allowed");
                    Ok(Authorized::User(user))
                }
                Basic::Denied => {
                    count("denied");
                    Err(Refused::Kind(ErrorKind::Unauthorized))
                }
                Basic::Busy => {
                    count("busy");
                    Err(Refused::Kind(ErrorKind::AuthUnavailable))
                }
            }
        }
        RouteAuth::Forward(f) => {
            let verdict = ask(f, asking, cfg).await;
            count(match &verdict {
                Ok(_) => "allowed",
                Err(Refused::Answer(_)) => "denied",
                Err(Refused::Kind(ErrorKind::Timeout)) => "timeout",
                Err(Refused::Kind(_)) => "unavailable",
            });
            if let Err(Refused::Kind(kind)) = &verdict {
                tracing::warn!(route = %route.label, upstream = %f.upstream.authority, result = ?kind, "auth.forward: no answer from the auth service; refused with 503");
            }
            // A timeout is the auth service's, and the client gets the same 503 either way.
            verdict.map_err(|r| match r {
                Refused::Kind(_) => Refused::Kind(ErrorKind::AuthUnavailable),
                answer => answer,
            })
        }
    }
}

/// One exchange with the auth service, all within the route's `auth.forward.timeout`.
async fn ask(f: &ForwardRoute, asking: &Asking<'_>, cfg: &Config) -> Result<Authorized, Refused> {
    let timeout = f.spec.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let req = auth_request(f, asking).map_err(Refused::Kind)?;
    let deadlines = Deadlines {
        connect: cfg.timeouts.upstream_connect.min(timeout),
        checkout_by: deadline,
        response: timeout,
        clients: false,
        write: timeout,
    };
    let exchange = async {
        let (resp, lease) = crate::upstream::send(&f.upstream, req, &deadlines)
            .await
            .map_err(|e| {
                tracing::debug!(error = %e.error.chain(), "auth.forward exchange failed");
                Refused::Kind(match e.error.kind {
                    ErrorKind::Timeout => ErrorKind::Timeout,
                    _ => ErrorKind::UpstreamFailed,
                })
            })?;
        let (parts, body) = resp.into_parts();
        let (body, ended) = bounded_body(body, FORWARD_AUTH_BODY_MAX).await;
        lease.finish(ended);
        Ok::<_, Refused>((parts, body))
    };
    let (parts, body) = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| Refused::Kind(ErrorKind::Timeout))??;
    if parts.status.is_success() {
        let mut fields = HeaderMap::new();
        for name in &f.spec.response_headers {
            for v in parts.headers.get_all(name) {
                fields.append(name.clone(), v.clone());
            }
        }
        return Ok(Authorized::Fields(fields));
    }
    Err(Refused::Answer(Box::new(relayed_refusal(&parts, body))))
}

/// The request the auth service gets: GET of its path, the configured client fields, and what
/// the request was (`X-Forwarded-Method`, `-Proto`, `-Host`, `-Uri`, `-For`). No body.
fn auth_request(f: &ForwardRoute, a: &Asking<'_>) -> Result<Request<RequestBody>, ErrorKind> {
    let mut req = Request::new(RequestBody::whole(Bytes::new(), None));
    *req.uri_mut() = f
        .spec
        .path
        .parse()
        .map_err(|_| ErrorKind::AuthUnavailable)?;
    // The service's own authority, as its URL names it (an HTTP/2 connection carries it as
    // `:authority`).
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&f.spec.upstream.authority) {
        h.insert(header::HOST, v);
    }
    for name in &f.spec.request_headers {
        for v in a.headers.get_all(name) {
            h.append(name.clone(), v.clone());
        }
    }
    let target = a.uri.path_and_query().map_or("/", |p| p.as_str());
    let facts = [
        ("x-forwarded-method", a.method.as_str()),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", a.host),
        ("x-forwarded-uri", target),
    ];
    for (name, value) in facts {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    h.insert(
        HeaderName::from_static("x-forwarded-for"),
        PeerForwarding::new(a.client).xff,
    );
    Ok(req)
}

/// Reads at most `max` bytes of a body: the bytes (None past `max`), and whether it ended.
async fn bounded_body(mut body: Incoming, max: usize) -> (Option<Bytes>, bool) {
    use http_body_util::BodyExt;
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (None, false);
        };
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > max {
                return (None, false);
            }
            out.extend_from_slice(d);
        }
    }
    (Some(out.freeze()), true)
}

/// The auth service's refusal as the client gets it: its status, the fields a login flow needs,
/// and its body when it is short enough.
fn relayed_refusal(parts: &http::response::Parts, body: Option<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body.unwrap_or_default()));
    *resp.status_mut() = parts.status;
    for name in RELAYED {
        for v in parts.headers.get_all(&name) {
            resp.headers_mut().append(name.clone(), v.clone());
        }
    }
    resp
}

/// What the upstream learns from auth. The client's own copies of the fields auth sets are gone
/// whatever auth found (`remove` is the route's `response_headers`).
pub(super) fn hand_over(
    headers: &mut HeaderMap,
    authorized: Option<Authorized>,
    remove: &[HeaderName],
) {
    for name in remove {
        headers.remove(name);
    }
    match authorized {
        None => {}
        Some(Authorized::User(user)) => {
            headers.remove(header::AUTHORIZATION);
            if let Ok(v) = HeaderValue::from_bytes(user.as_bytes()) {
                headers.insert(crate::headers::X_FORWARDED_USER, v);
            }
        }
        Some(Authorized::Fields(fields)) => {
            let mut last: Option<HeaderName> = None;
            for (name, value) in fields {
                // `HeaderMap`'s iterator names a field once, before its first value.
                if let Some(n) = name {
                    last = Some(n);
                }
                if let Some(n) = &last {
                    headers.append(n.clone(), value);
                }
            }
        }
    }
}
