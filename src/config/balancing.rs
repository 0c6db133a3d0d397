//! The route keys about choosing upstreams and living with sick ones: weighted `upstreams`,
//! `balance`, `health`, `passive` and `retry`. Raw serde shapes, then the typed values the rest of
//! the crate uses (parse, don't validate twice).
//!
//! Owns: their syntax, defaults and ranges. Must not touch: what is done with them (upstream
//! health and balancing, the request path's retries).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{Dur, UpstreamUrl};

/// An entry of `upstreams`: a URL string (weight 1) or `{url, weight}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WeightedUpstream {
    pub url: UpstreamUrl,
    /// 1 to 1000.
    pub weight: u32,
}

pub const MAX_WEIGHT: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeighted {
    url: UpstreamUrl,
    weight: Option<Weight>,
}

struct Weight(u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if (1..=u64::from(MAX_WEIGHT)).contains(&n) {
            Ok(Weight(n as u32))
        } else {
            Err(de::Error::custom(format!(
                "weight {n} is out of range: an upstream's weight is a whole number from 1 to {MAX_WEIGHT}"
            )))
        }
    }
}

impl<'de> Deserialize<'de> for WeightedUpstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WeightedUpstream;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an upstream URL like \"http://10.0.0.5:3000\", or {url, weight}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<WeightedUpstream, E> {
                let url = s.parse().map_err(E::custom)?;
                Ok(WeightedUpstream { url, weight: 1 })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WeightedUpstream, A::Error> {
                let raw = RawWeighted::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(WeightedUpstream {
                    url: raw.url,
                    weight: raw.weight.map_or(1, |w| w.0),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// How a route spreads its requests (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices over requests in flight, weighted.
    LeastRequest,
    /// Weighted random.
    Random,
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round_robin" => Ok(Balance::RoundRobin),
            "least_request" => Ok(Balance::LeastRequest),
            "random" => Ok(Balance::Random),
            _ => Err(format!(
                "balance {s:?} must be \"round_robin\", \"least_request\" or \"random\""
            )),
        }
    }
}
deserialize_from_str!(Balance);

/// What an active health check does (`health.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CheckKind {
    /// A GET of `path` over the upstream's own protocol and TLS settings.
    #[default]
    Http,
    /// A TCP connect, nothing sent.
    Tcp,
    /// `grpc.health.v1.Health/Check` for the whole server (empty service name).
    Grpc,
}

impl FromStr for CheckKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(CheckKind::Http),
            "tcp" => Ok(CheckKind::Tcp),
            "grpc" => Ok(CheckKind::Grpc),
            _ => Err(format!(
                "health.kind {s:?} must be \"http\", \"tcp\" or \"grpc\""
            )),
        }
    }
}
deserialize_from_str!(CheckKind);

/// Statuses a health check accepts (`expect_status`): codes and inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusSet(pub Vec<(u16, u16)>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl Default for StatusSet {
    fn default() -> StatusSet {
        StatusSet(vec![(200, 399)])
    }
}

impl fmt::Display for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for StatusSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "expect_status {s:?} is not a status or range list: write it like \"200\", \"200,204\" or \"200-399\" (codes 100-599)"
            )
        };
        let code = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
        };
        let mut out = Vec::new();
        for item in s.split(',') {
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (code(a).ok_or_else(bad)?, code(b).ok_or_else(bad)?),
                None => {
                    let c = code(item).ok_or_else(bad)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(bad());
            }
            if out.len() == 16 {
                return Err(format!("expect_status {s:?} has more than 16 items"));
            }
            out.push((lo, hi));
        }
        Ok(StatusSet(out))
    }
}

impl<'de> Deserialize<'de> for StatusSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CodeOrText(|s: &str| s.parse::<StatusSet>()))
    }
}

/// A value written as a YAML number or a string, read through `parse` as text.
struct CodeOrText<F>(F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for CodeOrText<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or a string")
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        (self.0)(&n.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        (self.0)(&n.to_string()).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        (self.0)(s).map_err(E::custom)
    }
}

/// An active health check, as validated. Part of the upstream's identity: changing it restarts
/// the checker with fresh state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// http: the path and query requested.
    pub path: String,
    /// http: the Host sent; None: the upstream's own (`server_name`, else the URL's authority).
    pub host: Option<String>,
    pub expect: StatusSet,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

/// Outlier detection from live traffic (`passive`), on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Passive {
    /// 0: off.
    pub consecutive_failures: u32,
    /// The first ejection; each one that follows doubles it, up to `MAX_EJECTION`.
    pub ejection: Duration,
}

pub const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Default for Passive {
    fn default() -> Passive {
        Passive {
            consecutive_failures: 5,
            ejection: Duration::from_secs(30),
        }
    }
}

/// One reason a request may be tried again on another upstream (`retry.on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    ConnectFailure,
    Reset,
    Timeout,
    Status502,
    Status503,
    Status504,
}

impl RetryReason {
    pub const ALL: [RetryReason; 6] = [
        RetryReason::ConnectFailure,
        RetryReason::Reset,
        RetryReason::Timeout,
        RetryReason::Status502,
        RetryReason::Status503,
        RetryReason::Status504,
    ];

    /// As written in `retry.on`, and the `reason` label of `limen_upstream_retries_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ConnectFailure => "connect_failure",
            RetryReason::Reset => "reset",
            RetryReason::Timeout => "timeout",
            RetryReason::Status502 => "502",
            RetryReason::Status503 => "503",
            RetryReason::Status504 => "504",
        }
    }

    /// The reason an upstream answer with this status gives, if any.
    pub fn of_status(status: u16) -> Option<RetryReason> {
        match status {
            502 => Some(RetryReason::Status502),
            503 => Some(RetryReason::Status503),
            504 => Some(RetryReason::Status504),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl FromStr for RetryReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RetryReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "retry.on {s:?}: use connect_failure, reset, timeout, \"502\", \"503\" or \"504\""
                )
            })
    }
}

impl<'de> Deserialize<'de> for RetryReason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CodeOrText(|s: &str| s.parse::<RetryReason>()))
    }
}

/// The set of `retry.on` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RetryOn(u8);

impl RetryOn {
    pub fn has(self, r: RetryReason) -> bool {
        self.0 & r.bit() != 0
    }

    /// Whether any reason that arises after the request was sent is on.
    pub fn after_sending(self) -> bool {
        RetryReason::ALL
            .into_iter()
            .any(|r| r != RetryReason::ConnectFailure && self.has(r))
    }
}

impl FromIterator<RetryReason> for RetryOn {
    fn from_iter<I: IntoIterator<Item = RetryReason>>(iter: I) -> RetryOn {
        RetryOn(iter.into_iter().fold(0, |acc, r| acc | r.bit()))
    }
}

/// `retry`, as validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Retry {
    /// Extra tries, each on another upstream where one is left.
    pub attempts: u32,
    pub on: RetryOn,
    /// Retries at most this share (per mille) of the route's requests over the last 10 s.
    pub budget_permille: u32,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: 1,
            on: [RetryReason::ConnectFailure].into_iter().collect(),
            budget_permille: 200,
        }
    }
}

/// A share written `20%` (or `2.5%`), 0 to 100, kept in per mille.
#[derive(Debug)]
struct Percent(u32);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("retry.budget {s:?} must be a percentage like \"20%\" (0% to 100%)");
        let n: f64 = s
            .trim()
            .strip_suffix('%')
            .ok_or_else(bad)?
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&n) {
            return Err(bad());
        }
        Ok(Percent((n * 10.0).round() as u32))
    }
}
deserialize_from_str!(Percent);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    kind: Option<CheckKind>,
    path: Option<String>,
    host: Option<String>,
    expect_status: Option<StatusSet>,
    interval: Option<Dur>,
    timeout: Option<Dur>,
    healthy_after: Option<u32>,
    unhealthy_after: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPassive {
    consecutive_failures: Option<u32>,
    ejection: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    attempts: Option<u32>,
    on: Option<Vec<RetryReason>>,
    budget: Option<Percent>,
}

/// What a route with upstreams says about balancing, health and retries.
pub(super) struct RawBalancing {
    pub balance: Option<Balance>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub retry: Option<RawRetry>,
}

impl RawBalancing {
    pub fn is_empty(&self) -> bool {
        self.balance.is_none()
            && self.health.is_none()
            && self.passive.is_none()
            && self.retry.is_none()
    }
}

/// The validated form of a route's balancing keys.
pub(super) struct Balancing {
    pub balance: Balance,
    pub health: Option<HealthCheck>,
    pub passive: Passive,
    pub retry: Retry,
}

/// Validates the balancing keys of a route whose host is `exact_host` (when it names one host)
/// and whose upstreams are `upstreams` (`h2_only`: their https ones are pinned to HTTP/1.1).
pub(super) fn balancing_from(
    raw: RawBalancing,
    exact_host: Option<&str>,
    upstreams: &[WeightedUpstream],
    https_http1_only: bool,
) -> Result<Balancing, String> {
    let health = raw
        .health
        .map(|h| health_from(h, exact_host, upstreams, https_http1_only))
        .transpose()?;
    let p = raw.passive.unwrap_or_default();
    let defaults = Passive::default();
    let passive = Passive {
        consecutive_failures: p
            .consecutive_failures
            .unwrap_or(defaults.consecutive_failures),
        ejection: p.ejection.map_or(defaults.ejection, |d| d.0),
    };
    if passive.consecutive_failures > 1000 {
        return Err("passive.consecutive_failures must be 0 (off) to 1000".into());
    }
    if passive.ejection.is_zero() || passive.ejection > MAX_EJECTION {
        return Err("passive.ejection must be more than 0 and at most 5m".into());
    }
    let r = raw.retry.unwrap_or_default();
    let defaults = Retry::default();
    let retry = Retry {
        attempts: r.attempts.unwrap_or(defaults.attempts),
        on: r.on.map_or(defaults.on, |on| on.into_iter().collect()),
        budget_permille: r.budget.map_or(defaults.budget_permille, |p| p.0),
    };
    if retry.attempts > 10 {
        return Err("retry.attempts must be 0 to 10".into());
    }
    Ok(Balancing {
        balance: raw.balance.unwrap_or_default(),
        health,
        passive,
        retry,
    })
}

fn health_from(
    h: RawHealth,
    exact_host: Option<&str>,
    upstreams: &[WeightedUpstream],
    https_http1_only: bool,
) -> Result<HealthCheck, String> {
    let kind = h.kind.unwrap_or_default();
    if kind != CheckKind::Http {
        for (key, set) in [
            ("path", h.path.is_some()),
            ("host", h.host.is_some()),
            ("expect_status", h.expect_status.is_some()),
        ] {
            if set {
                return Err(format!("health.{key} applies to kind http only"));
            }
        }
    }
    if kind == CheckKind::Grpc {
        if let Some(u) = upstreams
            .iter()
            .find(|u| !u.url.may_speak_h2(https_http1_only))
        {
            return Err(format!(
                "upstream {}: health kind grpc needs an h2c:// or https:// upstream that may speak HTTP/2 (gRPC runs over HTTP/2)",
                u.url
            ));
        }
    }
    let path = h.path.unwrap_or_else(|| "/".into());
    if !path.starts_with('/')
        || path.len() > 1024
        || path.parse::<http::uri::PathAndQuery>().is_err()
    {
        return Err(format!(
            "health.path {path:?} must be a path like \"/healthz\" (at most 1024 bytes)"
        ));
    }
    let host = match h.host {
        Some(host) => {
            if host.parse::<http::uri::Authority>().is_err() || host.contains('@') {
                return Err(format!(
                    "health.host {host:?} is not a host name (with an optional :port)"
                ));
            }
            Some(host)
        }
        // Only an http check sends a Host: for the others it must not tell apart otherwise
        // equal upstreams of routes with different hosts.
        None if kind == CheckKind::Http => exact_host.map(str::to_owned),
        None => None,
    };
    let interval = h.interval.map_or(Duration::from_secs(5), |d| d.0);
    let timeout = h.timeout.map_or(Duration::from_secs(2), |d| d.0);
    if interval < Duration::from_millis(100) {
        return Err("health.interval must be at least 100ms".into());
    }
    if timeout.is_zero() || timeout > interval {
        return Err(format!(
            "health.timeout ({timeout:?}) must be more than 0 and at most health.interval ({interval:?})"
        ));
    }
    let healthy_after = h.healthy_after.unwrap_or(2);
    let unhealthy_after = h.unhealthy_after.unwrap_or(3);
    for (key, n) in [
        ("healthy_after", healthy_after),
        ("unhealthy_after", unhealthy_after),
    ] {
        if !(1..=100).contains(&n) {
            return Err(format!("health.{key} must be 1 to 100"));
        }
    }
    Ok(HealthCheck {
        kind,
        path,
        host,
        expect: h.expect_status.unwrap_or_default(),
        interval,
        timeout,
        healthy_after,
        unhealthy_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_sets_parse_codes_and_ranges() {
        let s: StatusSet = "200, 204,300-399".parse().unwrap();
        assert!(s.contains(204) && s.contains(350) && !s.contains(201));
        assert_eq!(s.to_string(), "200,204,300-399");
        for bad in ["2xx", "200-", "399-200", "99", "600", ""] {
            assert!(bad.parse::<StatusSet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn budgets_are_percentages() {
        assert_eq!("20%".parse::<Percent>().unwrap().0, 200);
        assert_eq!("2.5%".parse::<Percent>().unwrap().0, 25);
        for bad in ["20", "101%", "-1%", "x%"] {
            assert!(bad.parse::<Percent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_reasons_are_a_set() {
        let on: RetryOn = [RetryReason::Reset, RetryReason::Status503]
            .into_iter()
            .collect();
        assert!(on.has(RetryReason::Reset) && on.has(RetryReason::Status503));
        assert!(!on.has(RetryReason::ConnectFailure) && on.after_sending());
        assert!(!Retry::default().on.after_sending());
    }
}
