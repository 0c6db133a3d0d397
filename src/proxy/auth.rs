//! Stage 1c, auth: the route's `auth.basic` (401 with the route's challenge), after its access
//! lists and rate limit and before any body is read. The verified user goes upstream in
//! `X-Forwarded-User`, never the credential.
//!
//! Owns: the verdict's mapping to an answer and its count. Must not touch: hashing (`crate::auth`
//! bounds it), the request's other headers.

#[allow(unused_imports)]
use super::*;

use crate::auth::Basic;
use crate::metrics::AuthLabels;
use crate::routing::RouteAuth;

/// The route's auth: Ok with the user to name upstream, or the refusal.
pub(super) async fn authorize(
    auth: &RouteAuth,
    route: &Route,
    headers: &HeaderMap,
    metrics: &crate::metrics::Metrics,
) -> Result<Option<String>, ErrorKind> {
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
            Err(ErrorKind::Unauthorized)
        }
        RouteAuth::Basic(Some(users)) => {
            match crate::auth::check_basic(users, headers.get(header::AUTHORIZATION)).await {
                Basic::Allowed(user) => {
                    count("allowed");
                    Ok(Some(user))
                }
                Basic::Denied => {
                    count("denied");
                    Err(ErrorKind::Unauthorized)
                }
                Basic::Busy => {
                    count("busy");
                    Err(ErrorKind::AuthUnavailable)
                }
            }
        }
    }
}

/// What the upstream learns of a basic-auth user: the name, and not the credential.
pub(super) fn hand_over_user(headers: &mut HeaderMap, user: &str) {
    headers.remove(header::AUTHORIZATION);
    if let Ok(v) = HeaderValue::from_bytes(user.as_bytes()) {
        headers.insert(crate::headers::X_FORWARDED_USER, v);
    }
}
