//! Who may reach a route: its `access` lists, `rate_limit` and `auth`, read and validated at load.
//!
//! Owns: their syntax, defaults and bounds, and the address sets the access lists compile to.
//! Must not touch: enforcing them (the request path), the users file's content (the reloader reads
//! it as a watched secret), rate-limit state (it outlives a config).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderName;
use serde::{de, Deserialize, Deserializer};

use super::values::{Dur, IpBlock, UpstreamScheme, UpstreamUrl};
use super::UpstreamTls;

// ---------------------------------------------------------------- access

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    allow: Option<Vec<IpBlock>>,
    #[serde(default)]
    deny: Vec<IpBlock>,
}

/// A route's `access`: `deny` wins; without `allow`, everyone not denied.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    pub allow: Option<IpSet>,
    pub deny: IpSet,
}

impl Access {
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip) && self.allow.as_ref().is_none_or(|a| a.contains(ip))
    }
}

/// A set of CIDR blocks, looked up with one hash probe per distinct prefix length (a list of
/// 1,000 blocks usually has a handful), not one comparison per block.
#[derive(Debug, Clone, Default)]
pub struct IpSet {
    /// As written, for the diff and the status page.
    pub blocks: Vec<IpBlock>,
    v4: Vec<(u8, HashSet<u32>)>,
    v6: Vec<(u8, HashSet<u128>)>,
}

impl PartialEq for IpSet {
    fn eq(&self, other: &IpSet) -> bool {
        self.blocks == other.blocks
    }
}

fn mask4(a: u32, prefix: u8) -> u32 {
    a.checked_shr(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(a: u128, prefix: u8) -> u128 {
    a.checked_shr(128 - u32::from(prefix)).unwrap_or(0)
}

impl IpSet {
    pub fn new(blocks: Vec<IpBlock>) -> IpSet {
        let mut set = IpSet {
            blocks,
            ..IpSet::default()
        };
        for b in &set.blocks {
            match b.net {
                IpAddr::V4(n) => {
                    let at = match set.v4.iter().position(|(p, _)| *p == b.prefix) {
                        Some(i) => i,
                        None => {
                            set.v4.push((b.prefix, HashSet::new()));
                            set.v4.len() - 1
                        }
                    };
                    set.v4[at].1.insert(mask4(u32::from(n), b.prefix));
                }
                IpAddr::V6(n) => {
                    let at = match set.v6.iter().position(|(p, _)| *p == b.prefix) {
                        Some(i) => i,
                        None => {
                            set.v6.push((b.prefix, HashSet::new()));
                            set.v6.len() - 1
                        }
                    };
                    set.v6[at].1.insert(mask6(u128::from(n), b.prefix));
                }
            }
        }
        set
    }

    /// Whether a block holds `ip`; an IPv4-mapped IPv6 address is its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|(p, s)| s.contains(&mask4(a, *p)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|(p, s)| s.contains(&mask6(a, *p)))
            }
        }
    }
}

pub(super) fn access_from(raw: Option<RawAccess>) -> Result<Option<Access>, String> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.allow.as_ref().is_some_and(Vec::is_empty) {
        return Err(
            "access.allow is empty, which admits no one: list who may come, or remove the key to admit everyone not in access.deny".into(),
        );
    }
    if raw.allow.is_none() && raw.deny.is_empty() {
        return Err("access needs allow, deny or both".into());
    }
    Ok(Some(Access {
        allow: raw.allow.map(IpSet::new),
        deny: IpSet::new(raw.deny),
    }))
}

// ---------------------------------------------------------------- rate limit

/// `rate`: how many requests per second, minute or hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The time one request's token takes to come back.
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        let bad =
            || format!("rate {s:?} must be a count per unit: \"100/s\", \"600/m\" or \"1000/h\"");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 || count > 1_000_000 {
            return Err(format!("rate {s:?}: the count must be from 1 to 1000000"));
        }
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// What a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The client's address: the PROXY header's or the socket's, after `trusted_proxies`.
    Client,
    /// A request header's value (requests without it share one bucket).
    Header(HeaderName),
}

impl FromStr for RateKey {
    type Err = String;
    fn from_str(s: &str) -> Result<RateKey, String> {
        if s == "client" {
            return Ok(RateKey::Client);
        }
        let name = s
            .strip_prefix("header:")
            .ok_or_else(|| format!("rate_limit.key {s:?} must be \"client\" or \"header:NAME\""))?;
        HeaderName::from_bytes(name.as_bytes())
            .map(RateKey::Header)
            .map_err(|_| format!("rate_limit.key {s:?}: {name:?} is not a header name"))
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    rate: Rate,
    burst: Option<super::values::Bounded<1, 1_000_000>>,
    key: Option<RateKey>,
    max_keys: Option<super::values::Bounded<1, 10_000_000>>,
}

/// A route's `rate_limit`: a bucket of `burst` per key, refilled at `rate`; at most `max_keys`
/// keys tracked, the least recently used forgotten first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub rate: Rate,
    pub burst: u32,
    pub key: RateKey,
    pub max_keys: usize,
}

/// Keys one route tracks by default: about 5 MB of state at most.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

pub(super) fn rate_limit_from(raw: Option<RawRateLimit>) -> Option<RateLimit> {
    let raw = raw?;
    Some(RateLimit {
        rate: raw.rate,
        // A burst of one rate's worth unless told: `100/s` lets 100 through at once.
        burst: raw
            .burst
            .map_or(raw.rate.count, |b| u32::try_from(b.0).unwrap_or(u32::MAX)),
        key: raw.key.unwrap_or(RateKey::Client),
        max_keys: raw.max_keys.map_or(DEFAULT_MAX_KEYS, |m| m.0),
    })
}

// ---------------------------------------------------------------- auth

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    basic: Option<RawBasic>,
    forward: Option<RawForward>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasic {
    users_file: PathBuf,
    realm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    url: ForwardUrl,
    request_headers: Option<Vec<String>>,
    #[serde(default)]
    response_headers: Vec<String>,
    timeout: Option<Dur>,
    upstream_tls: Option<super::raw::RawUpstreamTls>,
}

/// A route's `auth`.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    Basic(BasicAuth),
    Forward(ForwardAuth),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BasicAuth {
    /// htpasswd lines, bcrypt or argon2id; resolved against the config's folder.
    pub users_file: PathBuf,
    pub realm: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ForwardAuth {
    /// Where the auth service is dialled, like an upstream.
    pub upstream: UpstreamUrl,
    /// The path and query asked.
    pub path: String,
    pub request_headers: Vec<HeaderName>,
    pub response_headers: Vec<HeaderName>,
    pub timeout: Duration,
    pub upstream_tls: UpstreamTls,
}

/// `auth.forward.url`: an upstream URL with a path.
#[derive(Debug, Clone, PartialEq)]
struct ForwardUrl {
    upstream: UpstreamUrl,
    path: String,
}

impl FromStr for ForwardUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<ForwardUrl, String> {
        let uri: http::Uri = s
            .parse()
            .map_err(|_| format!("auth.forward.url {s:?} is not a URL"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path
        };
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "auth.forward.url {s:?}: the path must be printable and start with /"
            ));
        }
        let origin = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(a)) => format!("{scheme}://{a}"),
            _ => String::new(),
        };
        let upstream: UpstreamUrl = origin
            .parse()
            .map_err(|e: String| format!("auth.forward.url: {e}"))?;
        Ok(ForwardUrl { upstream, path })
    }
}

impl<'de> Deserialize<'de> for ForwardUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Header names an auth step may copy: none that frame or route a message.
fn copied_names(what: &str, raw: Vec<String>) -> Result<Vec<HeaderName>, String> {
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        let n = HeaderName::from_bytes(r.as_bytes())
            .map_err(|_| format!("auth.forward.{what}: {r:?} is not a header name"))?;
        if super::headers::FORBIDDEN.contains(&n.as_str()) {
            return Err(format!(
                "auth.forward.{what}: {r:?} frames or routes the message, which limen manages itself"
            ));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

pub(super) fn auth_from(
    raw: Option<RawAuth>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Option<Auth>, String> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match (raw.basic, raw.forward) {
        (Some(b), None) => {
            let realm = b.realm.unwrap_or_else(|| "limen".to_owned());
            // The realm is quoted in WWW-Authenticate: no quote, backslash or control byte.
            if realm.is_empty()
                || realm.len() > 128
                || !realm
                    .bytes()
                    .all(|c| (c == b' ' || c.is_ascii_graphic()) && c != b'"' && c != b'\\')
            {
                return Err(
                    "auth.basic.realm must be 1 to 128 printable ASCII characters without \" or \\"
                        .into(),
                );
            }
            Ok(Some(Auth::Basic(BasicAuth {
                users_file: resolve(b.users_file),
                realm,
            })))
        }
        (None, Some(f)) => {
            let tls_raw = f.upstream_tls;
            if tls_raw.is_some() && f.url.upstream.scheme != UpstreamScheme::Https {
                return Err("auth.forward.upstream_tls applies to an https:// url".into());
            }
            let https = [&f.url.upstream];
            let https: &[&UpstreamUrl] = if f.url.upstream.scheme == UpstreamScheme::Https {
                &https
            } else {
                &[]
            };
            let upstream_tls = super::build::upstream_tls_from(tls_raw, None, https, resolve)
                .map_err(|e| format!("auth.forward: {e}"))?;
            let request_headers = copied_names(
                "request_headers",
                f.request_headers
                    .unwrap_or_else(|| vec!["authorization".into(), "cookie".into()]),
            )?;
            let response_headers = copied_names("response_headers", f.response_headers)?;
            let timeout = f.timeout.map_or(Duration::from_secs(2), |d| d.0);
            if timeout.is_zero() || timeout > Duration::from_secs(60) {
                return Err("auth.forward.timeout must be more than 0 and at most 60s".into());
            }
            Ok(Some(Auth::Forward(ForwardAuth {
                upstream: f.url.upstream,
                path: f.url.path,
                request_headers,
                response_headers,
                timeout,
                upstream_tls,
            })))
        }
        (Some(_), Some(_)) => Err("auth takes one of basic or forward, not both".into()),
        (None, None) => Err("auth needs basic or forward".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(blocks: &[&str]) -> IpSet {
        IpSet::new(blocks.iter().map(|b| b.parse().unwrap()).collect())
    }

    #[test]
    fn an_ip_set_matches_v4_v6_and_mapped_clients_by_prefix() {
        let s = set(&["10.0.0.0/8", "203.0.113.7", "2001:db8::/32", "0.0.0.0/0"]);
        assert!(s.contains("10.200.1.1".parse().unwrap()));
        assert!(s.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(s.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
        let s = set(&["10.0.0.0/8", "203.0.113.7", "2001:db8::/32"]);
        assert!(s.contains("203.0.113.7".parse().unwrap()));
        assert!(!s.contains("203.0.113.8".parse().unwrap()));
        assert!(!s.contains("11.0.0.1".parse().unwrap()));
        let everyone = set(&["::/0"]);
        assert!(everyone.contains("::1".parse().unwrap()));
        assert!(
            !everyone.contains("127.0.0.1".parse().unwrap()),
            "IPv4 is not in ::/0"
        );
    }

    #[test]
    fn deny_wins_and_no_allow_list_admits_everyone_else() {
        let a = Access {
            allow: Some(set(&["10.0.0.0/8"])),
            deny: set(&["10.9.0.0/16"]),
        };
        assert!(a.admits("10.1.0.1".parse().unwrap()));
        assert!(!a.admits("10.9.0.1".parse().unwrap()));
        assert!(!a.admits("192.0.2.1".parse().unwrap()));
        let open = Access {
            allow: None,
            deny: set(&["192.0.2.0/24"]),
        };
        assert!(open.admits("198.51.100.1".parse().unwrap()));
        assert!(!open.admits("::ffff:192.0.2.9".parse().unwrap()));
    }

    #[test]
    fn rates_and_keys_parse_or_say_what_is_wanted() {
        let r: Rate = "100/s".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_millis(10));
        assert_eq!(
            "6/m".parse::<Rate>().unwrap().interval(),
            Duration::from_secs(10)
        );
        for bad in ["100", "0/s", "10/d", "x/s", "2000000/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!("client".parse::<RateKey>().unwrap(), RateKey::Client);
        assert!(
            matches!("header:Authorization".parse::<RateKey>().unwrap(), RateKey::Header(h) if h == "authorization")
        );
        assert!("header:bad name".parse::<RateKey>().is_err());
        assert!("ip".parse::<RateKey>().is_err());
    }

    #[test]
    fn a_forward_url_keeps_its_path_and_dials_like_an_upstream() {
        let f: ForwardUrl = "http://authz.internal:9000/check?x=1".parse().unwrap();
        assert_eq!(f.upstream.authority, "authz.internal:9000");
        assert_eq!(f.path, "/check?x=1");
        let f: ForwardUrl = "https://auth.test".parse().unwrap();
        assert_eq!(
            (f.upstream.authority.as_str(), f.path.as_str()),
            ("auth.test:443", "/")
        );
        assert!("ftp://a/b".parse::<ForwardUrl>().is_err());
        assert!("/check".parse::<ForwardUrl>().is_err());
    }
}
