//! Stage 1b, guard: who may reach the route. Its `access` lists (403), then its `rate_limit`
//! (429), before any body is read; `auth` follows (`auth.rs`).
//!
//! Owns: the client address a route's policy sees, and the bucket key. Must not touch: the
//! request (it is only read), upstreams.

#[allow(unused_imports)]
use super::*;

use crate::config::{IpBlock, RateKey};
use crate::metrics::{Metrics, RouteLabel};

/// The client a route's policy judges: the connection's peer (the PROXY header's address when
/// there was one), or, when that peer is a trusted proxy, the address its `X-Forwarded-For`
/// names: the rightmost entry that is not a trusted proxy itself. A client that is not trusted
/// cannot choose its address by sending the header.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[IpBlock]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|b| b.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(client) {
        return client;
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    let lines: Vec<&HeaderValue> = headers.get_all(&xff).iter().collect();
    for line in lines.iter().rev() {
        let Ok(text) = line.to_str() else {
            return client;
        };
        for entry in text.rsplit(',') {
            // A malformed hop ends the walk: nothing left of it can be vouched for.
            let Some(ip) = parse_hop(entry.trim()) else {
                return client;
            };
            client = ip.to_canonical();
            if !is_trusted(client) {
                return client;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, with a port or IPv6 brackets as some proxies write.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The route's `access`, then its `rate_limit`, each counted when it refuses.
pub(super) fn guard(
    route: &Route,
    client: IpAddr,
    headers: &HeaderMap,
    metrics: &Metrics,
) -> Result<(), ErrorKind> {
    let count = |family: &prometheus_client::metrics::family::Family<
        RouteLabel,
        prometheus_client::metrics::counter::Counter,
    >| {
        family
            .get_or_create(&RouteLabel {
                route: route.label.clone(),
            })
            .inc();
    };
    if let Some(access) = &route.access {
        if !access.admits(client) {
            count(&metrics.access_denied);
            return Err(ErrorKind::Forbidden);
        }
    }
    if let Some((key, limiter)) = &route.rate_limit {
        let verdict = match key {
            RateKey::Client => match client {
                IpAddr::V4(a) => limiter.check(&a.octets()),
                IpAddr::V6(a) => limiter.check(&a.octets()),
            },
            // Requests without the header share one bucket, keyed by nothing.
            RateKey::Header(name) => {
                limiter.check(headers.get(name).map_or(&b""[..], |v| v.as_bytes()))
            }
        };
        if let Err(retry_after) = verdict {
            count(&metrics.rate_limited);
            return Err(ErrorKind::RateLimited(retry_after));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_vouches_for_another() {
        let trusted: Vec<IpBlock> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_address(&xff(&["1.2.3.4"]), ip("203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        // A trusted peer: the rightmost untrusted hop, across lines and commas.
        assert_eq!(
            client_address(
                &xff(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]),
                ip("10.0.0.1"),
                &trusted
            ),
            ip("1.2.3.4")
        );
        // Ports and brackets as some proxies write them; mapped addresses are IPv4.
        assert_eq!(
            client_address(&xff(&["[2001:db8::1]"]), ip("10.0.0.1"), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_address(
                &xff(&["198.51.100.4:5555"]),
                ip("::ffff:10.0.0.1"),
                &trusted
            ),
            ip("198.51.100.4")
        );
        // Garbage stops the walk at the last hop vouched for.
        assert_eq!(
            client_address(&xff(&["1.2.3.4, junk, 10.0.0.8"]), ip("10.0.0.1"), &trusted),
            ip("10.0.0.8")
        );
        // No header: the trusted peer itself.
        assert_eq!(
            client_address(&HeaderMap::new(), ip("10.0.0.1"), &trusted),
            ip("10.0.0.1")
        );
    }
}
