//! Protocol upgrades (WebSocket): what the client offered, whether the upstream agreed, and the
//! tunnel that then copies bytes both ways until either side closes or shutdown ends it.
//!
//! Owns: upgrades and tunnels. Must not touch: HTTP framing after the switch.

#[allow(unused_imports)]
use super::*;

/// The protocols an HTTP/1.1 client asked to switch to (`Connection: upgrade` and `Upgrade`),
/// without `h2c`/`h2`: RFC 9113 3.1 removed that mechanism, and no upstream is asked to switch
/// to HTTP/2 behind limen. None: this is not an upgrade request.
pub(super) fn offered_upgrades<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || !has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return None;
    }
    let kept: Vec<&str> = tokens(req.headers(), header::UPGRADE)
        .filter(|t| {
            let name = t.split('/').next().unwrap_or("");
            !(name.eq_ignore_ascii_case("h2c") || name.eq_ignore_ascii_case("h2"))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// The upstream's 101 names at least one protocol, and only protocols the client offered
/// (RFC 9110 7.8): anything else would turn the connection into a raw pipe nobody agreed to.
pub(super) fn upgrade_agreed(response: &HeaderMap, offered: &HeaderValue) -> bool {
    let offered: Vec<&str> = offered
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let mut named = tokens(response, header::UPGRADE).peekable();
    named.peek().is_some() && named.all(|t| offered.iter().any(|o| o.eq_ignore_ascii_case(t)))
}

/// Hands the client a 101 and joins both upgraded connections once hyper releases them.
pub(super) fn tunnel(
    up_resp: Response<Incoming>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    route: &Route,
    conn: Arc<ConnInfo>,
    t: &crate::config::Timeouts,
) -> Response<ResponseBody> {
    let t = t.clone();
    let mut shutdown = conn.shutdown.clone();
    let (parts, body) = up_resp.into_parts();
    let upstream_upgrade = hyper::upgrade::on(Response::from_parts(parts.clone(), body));
    let label = route.label.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(route = %label, error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        let mut dog = crate::watch::Watchdog::tunnel(&conn.activity, &t);
        let mut tick = tokio::time::interval(dog.period());
        loop {
            tokio::select! {
                r = &mut copy => {
                    if let Err(e) = r {
                        tracing::debug!(route = %label, error = %e, "upgraded tunnel ended");
                    }
                    break;
                }
                _ = shutdown.changed(), if dog.heeds_shutdown() => {
                    dog.shutdown(Instant::now());
                }
                _ = tick.tick() => {
                    if let crate::watch::Verdict::Close(why) = dog.tick(Instant::now(), |_| false) {
                        tracing::debug!(route = %label, "{why}: closing");
                        break;
                    }
                }
            }
        }
        drop(conn);
    });
    let mut resp = Response::from_parts(parts, ResponseBody::full(Bytes::new()));
    *resp.version_mut() = Version::HTTP_11;
    resp
}
