//! The typed values a config is written with: each parses from the string a user writes in YAML
//! (`FromStr`, and `Deserialize` through it, so a mistake carries its YAML location) and says what
//! to write instead when it does not.
//!
//! Owns: [`Dur`], [`Addr`], [`HostPattern`], [`PathPrefix`], [`UpstreamUrl`] and its
//! [`UpstreamScheme`], [`UpstreamProtocol`], [`IpBlock`], [`EscapedSlashes`], [`TlsVersion`], and
//! the `deserialize_from_str!` macro the other value types of `config` use. Must not touch: the
//! file's structure (`raw`) or rules that involve more than one value (`build`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration written like `500ms`, `5s`, `10m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("duration {s:?} has no unit: write it like 500ms, 5s, 10m or 1h")
        })?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} must start with a whole number, like 5s"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => {
                return Err(format!(
                    "duration {s:?} has an unknown unit {unit:?}: use ms, s, m or h"
                ))
            }
        };
        // Far beyond any sensible timeout, and small enough that `Instant + d` never overflows.
        if d > MAX_DURATION {
            return Err(format!("duration {s:?} is too long: at most 365 days"));
        }
        Ok(Dur(d))
    }
}

const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Deserialise any `FromStr` type from a YAML string, so its error carries the YAML location.
macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    };
}
deserialize_from_str!(Dur);

/// A whole number from `MIN` to `MAX`, refused while the YAML is read, so the error names the
/// key's line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded<const MIN: usize, const MAX: usize>(pub usize);

impl<'de, const MIN: usize, const MAX: usize> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        usize::try_from(n)
            .ok()
            .filter(|n| (MIN..=MAX).contains(n))
            .map(Bounded)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "{n} is out of range: use a number from {MIN} to {MAX}"
                ))
            })
    }
}

/// A listening address: `host:port` with a literal IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub SocketAddr);

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("localhost:") {
            let port: u16 = rest
                .parse()
                .map_err(|_| format!("address {s:?}: the port must be a number from 0 to 65535"))?;
            return Ok(Addr(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse().map(Addr).map_err(|_| {
            format!(
                "address {s:?} is not IP:PORT; write it like \"127.0.0.1:8443\" or \"[::]:8443\""
            )
        })
    }
}
deserialize_from_str!(Addr);

/// A host pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// One name, lower case.
    Exact(String),
    /// `*.parent`: any name exactly one label above `parent` (stored without the `*.`).
    Wildcard(String),
    /// `*`: any host.
    Any,
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(p) => write!(f, "*.{p}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(parent) = lower.strip_prefix("*.") {
            if valid_dns_name(parent) && parent.contains('.') {
                return Ok(HostPattern::Wildcard(parent.to_string()));
            }
            return Err(format!(
                "host {s:?}: a wildcard covers exactly one label above a name of two labels or more, like \"*.example.test\""
            ));
        }
        if lower.parse::<IpAddr>().is_ok() {
            return Ok(HostPattern::Exact(lower));
        }
        if lower.contains(':') {
            return Err(format!(
                "host {s:?}: write the host name without a port; routes match any port"
            ));
        }
        if valid_dns_name(&lower) {
            return Ok(HostPattern::Exact(lower));
        }
        Err(format!(
            "host {s:?} is not a host name: use a name like \"app.example.test\", \"*.example.test\" or \"*\""
        ))
    }
}
deserialize_from_str!(HostPattern);

/// A path prefix: starts with `/`, no query, no trailing slash unless it is `/` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPrefix(pub String);

impl FromStr for PathPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // Printable ASCII, bounded: a prefix reaches log lines, the diff and the status page, and
        // requests are routed on ASCII paths (anything else comes %-escaped).
        if !s.starts_with('/')
            || s.contains(['?', '#', ' '])
            || s.len() > 2048
            || !s.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "path {s:?} must start with '/', be at most 2048 printable ASCII characters and hold no '?', '#' or space, like \"/api\" (write other characters %-escaped)"
            ));
        }
        // Requests are routed on their normalized path: a prefix that normalization would change
        // beyond escapes (which routing normalizes too) could never match.
        let segs: Vec<&str> = s[1..].split('/').collect();
        let last = segs.len() - 1;
        let bad_seg = segs.iter().enumerate().any(|(i, g)| {
            let name = g.split(';').next().unwrap_or("");
            name == "." || name == ".." || (g.is_empty() && i != last)
        });
        let bad_escape = s.match_indices('%').any(|(i, _)| {
            !s.get(i + 1..i + 3)
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        if bad_seg || bad_escape || s.contains('\\') {
            return Err(format!(
                "path {s:?} is not in normalized form (no `//`, `.` or `..` segments, backslashes or malformed %-escapes): requests are routed on their normalized path, so this prefix could never match"
            ));
        }
        // Stored in the one form requests are routed on (`/%61pi` is `/api`, `/a%2fb` is
        // `/a%2Fb`), so every comparison of prefixes (a file's duplicates, claims across
        // routes_dir files, the diff, probation) compares what routing compares. A prefix whose
        // escapes hide a dot segment (`/x/%2E%2E/api`) changes shape when normalized: refused.
        let hidden_dot = s[1..].split('/').any(|g| {
            let name = g.split(';').next().unwrap_or("");
            let name = name.replace("%2E", ".").replace("%2e", ".");
            name == "." || name == ".."
        });
        let normalized = crate::normalize::normalize_path(s, EscapedSlashes::Keep)
            .ok()
            .filter(|n| !hidden_dot && n.matches('/').count() == s.matches('/').count())
            .ok_or_else(|| {
                format!(
                    "path {s:?} is not in normalized form: its %-escapes hide a `.` or `..` segment, so requests, routed on their normalized path, could never match it"
                )
            })?;
        let trimmed = normalized.trim_end_matches('/');
        Ok(PathPrefix(if trimmed.is_empty() {
            "/".to_string()
        } else {
            trimmed.to_string()
        }))
    }
}
deserialize_from_str!(PathPrefix);

/// How limen speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamScheme {
    /// `http://`: HTTP/1.1 over TCP.
    Http,
    /// `h2c://`: HTTP/2 over TCP with prior knowledge (gRPC servers and the like).
    H2c,
    /// `https://`: TLS, then HTTP/2 or HTTP/1.1 as ALPN and `upstream_protocol` say.
    Https,
}

/// An upstream written `http://host:port` or `h2c://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamUrl {
    pub scheme: UpstreamScheme,
    /// `host:port`, as it is dialled.
    pub authority: String,
}

impl UpstreamUrl {
    /// Whether limen may speak HTTP/2 to it: `h2c://`, or `https://` unless the route says
    /// `upstream_protocol: http1`. What gRPC needs, for health checks and streaming calls alike.
    pub fn may_speak_h2(&self, https_http1_only: bool) -> bool {
        match self.scheme {
            UpstreamScheme::Http => false,
            UpstreamScheme::H2c => true,
            UpstreamScheme::Https => !https_http1_only,
        }
    }

    /// The pool key and the `upstream` label of logs and metrics: `host:port` for `http://` (as it
    /// always was), `h2c://host:port` otherwise.
    pub fn label(&self) -> String {
        match self.scheme {
            UpstreamScheme::Http => self.authority.clone(),
            UpstreamScheme::H2c => format!("h2c://{}", self.authority),
            UpstreamScheme::Https => format!("https://{}", self.authority),
        }
    }

    /// The host part, without port or brackets.
    pub fn host(&self) -> &str {
        let host = match self.authority.rsplit_once(':') {
            Some((h, _)) => h,
            None => &self.authority,
        };
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            UpstreamScheme::Http => write!(f, "http://{}", self.authority),
            UpstreamScheme::H2c => write!(f, "h2c://{}", self.authority),
            UpstreamScheme::Https => write!(f, "https://{}", self.authority),
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("upstream {s:?} {why}; write it like \"http://127.0.0.1:3000\" or \"h2c://127.0.0.1:50051\"")
        };
        let uri: http::Uri = s.parse().map_err(|_| bad("is not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => UpstreamScheme::Http,
            Some("h2c") => UpstreamScheme::H2c,
            Some("https") => UpstreamScheme::Https,
            _ => return Err(bad("must start with http://, h2c:// or https://")),
        };
        let auth = uri.authority().ok_or_else(|| bad("has no host"))?;
        if auth.as_str().contains('@') {
            return Err(bad("must not carry user information"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("must not have a path or query"));
        }
        if auth.host().is_empty() {
            return Err(bad("has no host"));
        }
        let port = auth
            .port_u16()
            .unwrap_or(if scheme == UpstreamScheme::Https {
                443
            } else {
                80
            });
        Ok(UpstreamUrl {
            scheme,
            authority: format!("{}:{port}", auth.host()),
        })
    }
}
deserialize_from_str!(UpstreamUrl);

/// What to speak over TLS to an `https://` upstream (`upstream_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    /// ALPN offers h2, then http/1.1; the upstream chooses.
    #[default]
    Auto,
    Http1,
    H2,
}

impl FromStr for UpstreamProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(UpstreamProtocol::Auto),
            "http1" => Ok(UpstreamProtocol::Http1),
            "h2" => Ok(UpstreamProtocol::H2),
            _ => Err(format!(
                "upstream_protocol {s:?} must be \"auto\", \"http1\" or \"h2\""
            )),
        }
    }
}
deserialize_from_str!(UpstreamProtocol);

/// A trusted proxy: one address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    pub net: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    /// The block, as IPv6, holds `a` (no IPv4 mapping).
    fn contains_v6(&self, a: std::net::Ipv6Addr) -> bool {
        let IpAddr::V6(n) = self.net else {
            return false;
        };
        if self.prefix == 0 {
            return true;
        }
        let shift = 128 - u32::from(self.prefix);
        u128::from(n) >> shift == u128::from(a) >> shift
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, len: u32, prefix: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (len - u32::from(prefix))
            }
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), 32, self.prefix)
                    == masked(u32::from(a).into(), 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), 128, self.prefix) == masked(u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whole = if self.net.is_ipv4() { 32 } else { 128 };
        if self.prefix == whole {
            write!(f, "{}", self.net)
        } else {
            write!(f, "{}/{}", self.net, self.prefix)
        }
    }
}

impl FromStr for IpBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or CIDR block like \"10.0.0.0/8\"");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        // Clients are compared as IPv4 when they come as IPv4-mapped IPv6 (`contains`), so a
        // block written in that form is the IPv4 block it means; one that holds part of the
        // mapped range and more (a prefix under 96) could never match an IPv4 client: refused.
        if let IpAddr::V6(v6) = net {
            let mapped_range = IpBlock {
                net,
                prefix: prefix.min(96),
            };
            if prefix >= 96 {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return Ok(IpBlock {
                        net: IpAddr::V4(v4),
                        prefix: prefix - 96,
                    });
                }
            } else if prefix > 0
                && mapped_range.contains_v6(std::net::Ipv6Addr::from(0xffff_u128 << 32))
            {
                return Err(format!(
                    "{s:?} holds IPv4-mapped addresses, which limen compares as IPv4 clients: write the IPv4 block (like \"10.0.0.0/8\") or an IPv6 block outside ::ffff:0:0/96"
                ));
            }
        }
        Ok(IpBlock { net, prefix })
    }
}
deserialize_from_str!(IpBlock);

/// `path_normalization.escaped_slashes`, defined with the normalizer that applies it.
pub use crate::normalize::EscapedSlashes;

impl FromStr for EscapedSlashes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(EscapedSlashes::Keep),
            "reject" => Ok(EscapedSlashes::Reject),
            _ => Err(format!(
                "escaped_slashes {s:?} must be \"keep\" or \"reject\""
            )),
        }
    }
}
deserialize_from_str!(EscapedSlashes);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    V12,
    V13,
}

impl FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.2" => Ok(TlsVersion::V12),
            "1.3" => Ok(TlsVersion::V13),
            _ => Err(format!("min_version {s:?} must be \"1.2\" or \"1.3\"")),
        }
    }
}
deserialize_from_str!(TlsVersion);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            "500ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("5s".parse::<Dur>().unwrap().0, Duration::from_secs(5));
        assert_eq!("10m".parse::<Dur>().unwrap().0, Duration::from_secs(600));
        assert!("5".parse::<Dur>().is_err());
        assert!("5d".parse::<Dur>().is_err());
        assert!("s".parse::<Dur>().is_err());
    }

    #[test]
    fn path_prefixes_must_be_in_normalized_form() {
        for bad in [
            "/a//b", "/a/./b", "/a/../b", "/a/..", "/..;x", "/a%zz", "/a%2", "/a\\b",
        ] {
            assert!(bad.parse::<PathPrefix>().is_err(), "{bad}");
        }
        // What reaches a log line or the status page: printable ASCII, bounded.
        let long = format!("/{}", "a".repeat(2048));
        for bad in [
            "/a\nWARN forged",
            "/a\r",
            "/caf\u{e9}",
            "/a\u{1b}[31m",
            &long,
        ] {
            let err = bad.parse::<PathPrefix>().unwrap_err();
            assert!(!err.contains('\n') && !err.contains('\r'), "{err}");
        }
        for good in ["/", "/api/", "/a%20b", "/a;v=1", "/.well-known"] {
            assert!(good.parse::<PathPrefix>().is_ok(), "{good}");
        }
        // Escapes hiding a dot segment change the path's shape: refused, not silently moved.
        for hidden in ["/x/%2E%2E/api", "/x/%2e/api", "/.%2e", "/a/%2E"] {
            assert!(hidden.parse::<PathPrefix>().is_err(), "{hidden}");
        }
        // Every spelling of one path is stored as the one form routing compares.
        let one = |s: &str| s.parse::<PathPrefix>().unwrap().0;
        assert_eq!(one("/%61pi"), "/api");
        assert_eq!(one("/%7Euser/"), "/~user");
        assert_eq!(one("/a%2fb"), one("/a%2Fb"));
        assert_eq!(one("/a%2fb"), "/a%2Fb");
        assert_eq!(one("/caf%c3%a9"), "/caf%C3%A9");
    }

    #[test]
    fn host_patterns() {
        assert_eq!("*".parse::<HostPattern>().unwrap(), HostPattern::Any);
        assert_eq!(
            "*.Example.test".parse::<HostPattern>().unwrap(),
            HostPattern::Wildcard("example.test".into())
        );
        assert!("*.test".parse::<HostPattern>().is_err());
        assert!("a.*.test".parse::<HostPattern>().is_err());
        assert!("a.test:443".parse::<HostPattern>().is_err());
    }

    #[test]
    fn ip_blocks() {
        let b: IpBlock = "10.0.0.0/8".parse().unwrap();
        assert!(b.contains("10.1.2.3".parse().unwrap()));
        assert!(!b.contains("11.1.2.3".parse().unwrap()));
        let one: IpBlock = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("::ffff:1.2.3.4".parse().unwrap()));
        // An IPv4-mapped block is the IPv4 block it means, for IPv4 and mapped clients alike.
        let mapped: IpBlock = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped, "10.0.0.0/8".parse().unwrap());
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().unwrap()));
        let host: IpBlock = "::ffff:127.0.0.2".parse().unwrap();
        assert!(host.contains("127.0.0.2".parse().unwrap()));
        // One that holds the mapped range and more could never match an IPv4 client.
        for wider in ["::ffff:0:0/90", "::/8", "::ffff:0:0/95"] {
            let err = wider.parse::<IpBlock>().unwrap_err();
            assert!(err.contains("IPv4-mapped"), "{wider}: {err}");
        }
        // IPv6 blocks elsewhere, and ::/0 (documented as all IPv6 clients), stay as written.
        assert!("2001:db8::/32".parse::<IpBlock>().is_ok());
        assert!("::/0".parse::<IpBlock>().is_ok());
    }
}
