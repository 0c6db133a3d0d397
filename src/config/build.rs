//! Building a validated [`Config`] from the file's schema: defaults, the rules a config must obey,
//! paths resolved against the config file's folder, and each route validated with its place in the
//! file.
//!
//! Owns: [`Config::load`], [`Config::parse`], `routes_from` (shared with `routes_dir`) and the
//! `*_from` steps. Must not touch: sockets, certificates' contents or the snapshot served; building
//! a config has no side effect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::files::{read_text, syntax_error};
use super::raw::{
    RawConfig, RawLimits, RawListen, RawReload, RawRespond, RawRoute, RawTimeouts, RawTls,
    RawUpstreamTls,
};
use super::{
    balancing, client_auth, headers, CertPair, Config, ConfigError, Dur, HostPattern, Limits,
    Listen, PathPrefix, Probation, ReloadSettings, RouteAction, RouteSpec, Timeouts, TlsSettings,
    UpstreamProtocol, UpstreamScheme, UpstreamTls, UpstreamUrl, WeightedUpstream,
};

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read_text(path)?, path)
    }

    /// Validates config text as if it were read from `path`. The rules are checked in the order
    /// of the steps below, so a file with several mistakes is reported the same way every time.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| syntax_error(path, &e))?;
        let resolve = resolver(path);
        let rule = |message: String| ConfigError::Rule {
            path: path.to_path_buf(),
            message,
        };
        let routes = routes_from(raw.routes, path, None, &resolve)?;
        let timeouts = timeouts_from(raw.timeouts);
        let limits = limits_from(raw.limits).map_err(rule)?;
        if raw.workers == Some(0) {
            return Err(rule(
                "workers must be at least 1 (or left out: one per core)".into(),
            ));
        }
        let reload = reload_from(raw.reload).map_err(rule)?;
        check_timeouts(&timeouts).map_err(rule)?;
        let listen = listen_from(raw.listen, &resolve).map_err(rule)?;
        let tls = tls_from(raw.tls, path, &resolve)?;
        Ok(Config {
            source: path.to_path_buf(),
            listen,
            tls,
            reload,
            timeouts,
            limits,
            trusted_proxies: raw.trusted_proxies,
            workers: raw.workers,
            access_log: raw.access_log,
            allow_underscores_in_headers: raw.allow_underscores_in_headers,
            escaped_slashes: raw.path_normalization.escaped_slashes,
            request_id: super::request_id::request_id_from(raw.request_id),
            routes_dir: raw.routes_dir.map(&resolve),
            routes,
        })
    }
}

/// `reload`: the poll interval, the content check and probation, each within its bounds.
fn reload_from(raw: RawReload) -> Result<ReloadSettings, String> {
    let interval = raw.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5));
    if interval < Duration::from_millis(10) {
        return Err("reload.interval must be at least 10ms".into());
    }
    let probation = raw.probation.map(|p| Probation {
        window: p.window.0,
        min_requests: p.min_requests,
        max_error_ratio: p.max_error_ratio,
    });
    if let Some(p) = &probation {
        if p.window.is_zero() || p.min_requests == 0 {
            return Err(
                "reload.probation: window must be more than 0 and min_requests at least 1".into(),
            );
        }
        if !(0.0..1.0).contains(&p.max_error_ratio) {
            return Err(format!(
                "reload.probation.max_error_ratio {} must be at least 0 and below 1 (0.5: roll back when more than half fail)",
                p.max_error_ratio
            ));
        }
    }
    Ok(ReloadSettings {
        interval,
        verify_every: raw
            .verify_every
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
        probation,
    })
}

/// Every timeout that bounds a wait must be more than 0 (the shutdown ones may be 0).
fn check_timeouts(timeouts: &Timeouts) -> Result<(), String> {
    for (name, d) in [
        ("timeouts.handshake", timeouts.handshake),
        ("timeouts.header_read", timeouts.header_read),
        ("timeouts.idle", timeouts.idle),
        ("timeouts.upstream_connect", timeouts.upstream_connect),
        ("timeouts.upstream_response", timeouts.upstream_response),
        ("timeouts.body_idle", timeouts.body_idle),
        ("timeouts.write_idle", timeouts.write_idle),
        (
            "timeouts.upstream_ping_interval",
            timeouts.upstream_ping_interval,
        ),
        (
            "timeouts.upstream_ping_timeout",
            timeouts.upstream_ping_timeout,
        ),
        ("timeouts.upstream_idle", timeouts.upstream_idle),
        ("timeouts.upstream_write", timeouts.upstream_write),
        ("timeouts.quic_idle", timeouts.quic_idle),
    ] {
        if d.is_zero() {
            return Err(format!("{name} must be more than 0"));
        }
    }
    Ok(())
}

/// `listen`: the addresses, the admin listener's exposure and PROXY protocol.
fn listen_from(raw: RawListen, resolve: &dyn Fn(PathBuf) -> PathBuf) -> Result<Listen, String> {
    let listen = Listen {
        https: raw.https.0,
        http: raw.http.map(|a| a.0),
        redirect_port: raw.redirect_port,
        admin: raw.admin.map(|a| a.0),
        admin_public: raw.admin_public,
        admin_token_file: raw.admin_token_file.map(resolve),
        proxy_protocol_from: raw.proxy_protocol.map(|p| p.from).unwrap_or_default(),
        http_proxy_protocol: raw.http_proxy_protocol,
        quic: raw.quic.map(|a| a.0),
        alt_svc: raw.alt_svc.unwrap_or(true) && raw.quic.is_some(),
        alt_svc_port: raw.alt_svc_port,
    };
    if listen.alt_svc_port.is_some() && listen.quic.is_none() {
        return Err(
            "listen.alt_svc_port is the port Alt-Svc names for HTTP/3, which needs listen.quic"
                .into(),
        );
    }
    if raw.alt_svc == Some(true) && listen.quic.is_none() {
        return Err("listen.alt_svc advertises HTTP/3, which needs listen.quic".into());
    }
    if listen.http_proxy_protocol && listen.proxy_protocol_from.is_empty() {
        return Err(
            "listen.http_proxy_protocol applies listen.proxy_protocol.from to listen.http; set that list first".into(),
        );
    }
    if let Some(admin) = listen.admin {
        if !admin.ip().is_loopback() && !listen.admin_public {
            return Err(format!(
                "listen.admin {admin} is not a loopback address; the admin listener exposes internals, so bind it to 127.0.0.1 or set listen.admin_public: true"
            ));
        }
    }
    Ok(listen)
}

/// `tls`: the certificates (at least one source of them), client auth and ticket keys.
fn tls_from(
    raw: RawTls,
    path: &Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<TlsSettings, ConfigError> {
    let tls = TlsSettings {
        cert_dirs: raw.cert_dirs.into_iter().map(resolve).collect(),
        certs: raw
            .certs
            .into_iter()
            .map(|p| CertPair {
                cert: resolve(p.cert),
                key: resolve(p.key),
            })
            .collect(),
        default_cert: raw.default_cert.map(|s| s.to_ascii_lowercase()),
        self_signed: raw.self_signed,
        ticket_keys: raw.ticket_keys.map(resolve),
        client_auth: client_auth::client_auth_from(raw.client_auth, path, resolve)?,
        min_version: raw.min_version,
        post_quantum: raw.post_quantum,
    };
    if tls.cert_dirs.is_empty() && tls.certs.is_empty() && !tls.self_signed {
        return Err(ConfigError::Rule {
            path: path.to_path_buf(),
            message: "tls has no certificates: give tls.cert_dirs or tls.certs, or set tls.self_signed: true for development".into(),
        });
    }
    Ok(tls)
}

/// Resolves a path written in the file at `path`: `./certs` beside `/etc/limen/proxy.yaml` is
/// `/etc/limen/certs`, without the `.`.
pub(super) fn resolver(path: &Path) -> impl Fn(PathBuf) -> PathBuf + '_ {
    let base = path.parent().unwrap_or(Path::new("."));
    move |p: PathBuf| {
        let joined = if p.is_absolute() { p } else { base.join(p) };
        joined
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect::<PathBuf>()
    }
}

/// The route list, each validated with its place in the file.
pub(super) fn routes_from(
    raw: Vec<Spanned<RawRoute>>,
    path: &Path,
    unit: Option<Arc<str>>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Vec<RouteSpec>, ConfigError> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut taken = Taken::default();
    for (index, spanned) in raw.into_iter().enumerate() {
        let (line, column) = (spanned.referenced.line(), spanned.referenced.column());
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message,
        };
        let spec = route_from(index, spanned.value, (line, column), &unit, resolve).map_err(
            |f| match f.at {
                Some((line, column)) => ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message: f.message,
                },
                None => invalid(f.message),
            },
        )?;
        taken.claim(&spec).map_err(invalid)?;
        routes.push(spec);
    }
    Ok(routes)
}

/// The names and identities (host, path and match) of the routes so far in one file, with where
/// each was.
#[derive(Default)]
struct Taken {
    names: HashMap<String, (u64, u64)>,
    routes: HashMap<(String, String), (u64, u64)>,
}

impl Taken {
    /// Records `spec`, unless a route before it has its name, or its host and path.
    fn claim(&mut self, spec: &RouteSpec) -> Result<(), String> {
        let (index, here) = (spec.index, (spec.line, spec.column));
        if let Some(name) = &spec.name {
            if let Some((l, c)) = self.names.insert(name.clone(), here) {
                return Err(format!(
                    "route {index}: name {name:?} is already used by the route at line {l}:{c}; names label metrics, so each must be unique"
                ));
            }
        }
        let (host, path) = spec.key();
        if let Some((l, c)) = self.routes.insert((host, path.clone()), here) {
            let what = if spec.matcher.is_empty() {
                "merge the two routes or change one"
            } else {
                "no request could tell the two apart: merge them or change one's match"
            };
            return Err(format!(
                "route {index} repeats host {} and path {path} already routed at line {l}:{c}: {what}",
                spec.host
            ));
        }
        Ok(())
    }
}

/// Why a route was refused, and where: at the route unless a key inside it is to blame.
struct RouteFault {
    message: String,
    at: Option<(u64, u64)>,
}

impl From<String> for RouteFault {
    fn from(message: String) -> RouteFault {
        RouteFault { message, at: None }
    }
}

/// One route, validated alone: its upstream TLS, balancing, headers, action, timeout and name.
fn route_from(
    index: usize,
    r: RawRoute,
    (line, column): (u64, u64),
    unit: &Option<Arc<str>>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<RouteSpec, RouteFault> {
    let in_route = |m: String| format!("route {index}: {m}");
    let https: Vec<&UpstreamUrl> = r
        .upstreams
        .iter()
        .map(|u| &u.url)
        .filter(|u| u.scheme == UpstreamScheme::Https)
        .collect();
    let upstream_tls = upstream_tls_from(r.upstream_tls, r.upstream_protocol, &https, resolve)
        .map_err(in_route)?;
    let raw_balancing = balancing::RawBalancing {
        balance: r.balance,
        health: r.health,
        passive: r.passive,
        retry: r.retry,
    };
    if r.upstreams.is_empty() && !raw_balancing.is_empty() {
        return Err(in_route(
            "balance, health, passive and retry apply to routes with upstreams, and this route has none".into(),
        ).into());
    }
    let exact_host = match &r.host {
        HostPattern::Exact(h) => Some(h.as_str()),
        _ => None,
    };
    let b = balancing::balancing_from(
        raw_balancing,
        exact_host,
        &r.upstreams,
        upstream_tls.protocol == UpstreamProtocol::Http1,
    )
    .map_err(in_route)?;
    let route_headers = headers::headers_from(r.headers).map_err(|e| RouteFault {
        message: in_route(e.message),
        at: Some(e.at),
    })?;
    let access = super::policy::access_from(r.access).map_err(in_route)?;
    let rate_limit = super::policy::rate_limit_from(r.rate_limit);
    let auth = super::policy::auth_from(r.auth, resolve).map_err(in_route)?;
    let rewrite = super::rewrite::rewrite_from(r.rewrite, r.strip_prefix).map_err(in_route)?;
    let compress = super::compress::compress_from(r.compress).map_err(in_route)?;
    if compress.is_some() && r.upstreams.is_empty() {
        return Err(in_route(
            "compress applies to the upstreams' responses, and this route has no upstreams".into(),
        )
        .into());
    }
    let edits = &route_headers.response;
    let edited = |n: &http::HeaderName| {
        edits.set.iter().any(|(s, _)| s == n) || edits.remove.iter().any(|r| r == n)
    };
    if compress.is_some() && edited(&http::header::CONTENT_ENCODING) {
        return Err(in_route(
            "headers.response edits content-encoding on a route with compress, which sets it to the coding it applied: remove the edit".into(),
        )
        .into());
    }
    let matcher = super::matching::match_from(r.matcher).map_err(|e| RouteFault {
        message: in_route(e.message),
        at: e.at,
    })?;
    let action = match r.redirect {
        Some(_) if !r.upstreams.is_empty() || r.respond.is_some() => {
            return Err(in_route(
                "redirect, respond and upstreams are three different answers: keep one".into(),
            )
            .into())
        }
        Some(raw) => RouteAction::Redirect(super::redirect::redirect_from(raw).map_err(in_route)?),
        None => action_from(index, &r.host, &r.path, r.upstreams, r.respond)?,
    };
    if r.timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(in_route("timeout must be more than 0".into()).into());
    }
    if let Some(name) = &r.name {
        // Unnamed routes are labelled by their index (`3`, or `file.yaml/3` in routes_dir), so a
        // name may not look like one. A name labels log lines, metrics and the status page: only
        // characters that cannot forge a line or break a label.
        let label_char = |b: u8| b.is_ascii_alphanumeric() || b"._:@+-".contains(&b);
        if name.is_empty()
            || name.len() > 64
            || name.bytes().all(|b| b.is_ascii_digit())
            || !name.bytes().all(label_char)
        {
            return Err(in_route(
                "name must be 1 to 64 characters of A-Z, a-z, 0-9 and . _ : @ + -, not only digits"
                    .into(),
            )
            .into());
        }
    }
    Ok(RouteSpec {
        index,
        unit: unit.clone(),
        name: r.name,
        host: r.host,
        path: r.path.0,
        matcher,
        action,
        strip_prefix: r.strip_prefix,
        timeout: r.timeout.map(|d| d.0),
        upstream_tls,
        balance: b.balance,
        health: b.health,
        passive: b.passive,
        retry: b.retry,
        headers: route_headers,
        access,
        rate_limit,
        auth,
        rewrite,
        compress,
        line,
        column,
    })
}

/// What the route does: proxy to its upstreams, or answer with `respond`; exactly one of them.
fn action_from(
    index: usize,
    host: &HostPattern,
    path: &PathPrefix,
    upstreams: Vec<WeightedUpstream>,
    respond: Option<RawRespond>,
) -> Result<RouteAction, String> {
    match (upstreams.is_empty(), respond) {
        (false, None) => Ok(RouteAction::Proxy(upstreams)),
        (true, Some(resp)) => {
            let status = http::StatusCode::from_u16(resp.status)
                .ok()
                .filter(|s| (200..=599).contains(&s.as_u16()))
                .ok_or_else(|| {
                    format!(
                        "route {index}: respond.status {} is not a final HTTP status (200-599)",
                        resp.status
                    )
                })?;
            Ok(RouteAction::Respond {
                status,
                body: resp.body,
            })
        }
        (true, None) => Err(format!(
            "route {index} ({host} {}) has none of `upstreams`, `respond` and `redirect`: give it at least one upstream like \"http://127.0.0.1:3000\"",
            path.0
        )),
        (false, Some(_)) => Err(format!(
            "route {index} has both `upstreams` and `respond`: keep one of them"
        )),
    }
}

/// A route's `upstream_tls` and `upstream_protocol`, which only `https://` upstreams use.
pub(super) fn upstream_tls_from(
    raw: Option<RawUpstreamTls>,
    protocol: Option<UpstreamProtocol>,
    https: &[&UpstreamUrl],
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<UpstreamTls, String> {
    let has_https = !https.is_empty();
    if !has_https && (raw.is_some() || protocol.is_some()) {
        return Err(
            "upstream_tls and upstream_protocol apply to https:// upstreams, and this route has none".into(),
        );
    }
    let raw = raw.unwrap_or_default();
    let client = match (raw.client_cert, raw.client_key) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        _ => return Err("upstream_tls needs both client_cert and client_key, or neither".into()),
    };
    if let Some(name) = &raw.server_name {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(format!(
                "upstream_tls.server_name {name:?} is not a DNS name or an IP address"
            ));
        }
    } else if let Some(u) = https
        .iter()
        .find(|u| rustls_pki_types::ServerName::try_from(u.host()).is_err())
    {
        return Err(format!(
            "upstream {u}: its host cannot be verified as a TLS name; set upstream_tls.server_name"
        ));
    }
    Ok(UpstreamTls {
        ca: raw.ca.map(resolve),
        server_name: raw.server_name,
        client,
        insecure_skip_verify: raw.insecure_skip_verify,
        protocol: protocol.unwrap_or_default(),
        post_quantum: raw.post_quantum.unwrap_or(true),
    })
}

fn timeouts_from(t: RawTimeouts) -> Timeouts {
    let secs = |o: Option<Dur>, s: u64| o.map(|d| d.0).unwrap_or(Duration::from_secs(s));
    Timeouts {
        handshake: secs(t.handshake, 10),
        header_read: secs(t.header_read, 10),
        idle: secs(t.idle, 60),
        upstream_connect: secs(t.upstream_connect, 5),
        upstream_response: secs(t.upstream_response, 60),
        body_idle: secs(t.body_idle, 30),
        write_idle: secs(t.write_idle, 30),
        shutdown_delay: secs(t.shutdown_delay, 0),
        shutdown_grace: secs(t.shutdown_grace, 30),
        upstream_ping_interval: secs(t.upstream_ping_interval, 10),
        upstream_ping_timeout: secs(t.upstream_ping_timeout, 20),
        upstream_idle: secs(t.upstream_idle, 30),
        upstream_write: secs(t.upstream_write, 60),
        quic_idle: secs(t.quic_idle, 30),
    }
}

fn limits_from(l: RawLimits) -> Result<Limits, String> {
    let limits = Limits {
        max_header_bytes: l.max_header_bytes.unwrap_or(65536),
        max_body_bytes: l.max_body_bytes.unwrap_or(0),
        max_connections: l.max_connections.unwrap_or(10000),
        min_body_rate: l.min_body_rate.unwrap_or(512),
        h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(128),
        quic_max_streams: l.quic_max_streams.map_or(100, |b| b.0 as u32),
        upstream_h2_streams: l
            .upstream_h2_streams
            .map_or(super::UPSTREAM_H2_STREAMS, |b| b.0),
        upstream_h2_connections: l
            .upstream_h2_connections
            .map_or(super::UPSTREAM_H2_CONNECTIONS, |b| b.0),
    };
    if limits.max_header_bytes < 1024 {
        return Err("limits.max_header_bytes must be at least 1024".into());
    }
    if limits.max_connections == 0 || limits.max_connections > 1_000_000 {
        return Err("limits.max_connections must be from 1 to 1000000".into());
    }
    if limits.max_header_bytes > 16 * 1024 * 1024 {
        return Err("limits.max_header_bytes must be at most 16777216".into());
    }
    if limits.h2_max_concurrent_streams == 0 {
        return Err("limits.h2_max_concurrent_streams must be at least 1".into());
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, CheckKind, Passive, Retry, RetryReason};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/limen/proxy.yaml"))
    }

    const MINIMAL: &str = "listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\n";

    #[test]
    fn defaults_fill_in() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.timeouts.handshake, Duration::from_secs(10));
        assert_eq!(c.limits.max_header_bytes, 65536);
        assert_eq!(c.reload.interval, Duration::from_secs(5));
        assert!(c.routes.is_empty());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = parse("listen: {https: \"127.0.0.1:1\"}\ntls:\n  cert_dirs: [./certs, /abs]\n")
            .unwrap();
        assert_eq!(c.tls.cert_dirs[0], Path::new("/etc/limen/certs"));
        assert_eq!(c.tls.cert_dirs[1], Path::new("/abs"));
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstream: [\"http://127.0.0.1:1\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("upstream"), "{err}");
        assert!(err.contains("7:") || err.contains("line 7"), "{err}");
    }

    #[test]
    fn a_refused_header_edit_names_the_line_and_column_of_its_key() {
        let route = "routes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n";
        for (headers, at, why) in [
            (
                "    headers:\n      request:\n        set:\n          x-ok: \"1\"\n          Content-Length: \"5\"\n",
                ":12:11:",
                "framing header",
            ),
            (
                "    headers:\n      response:\n        remove:\n          - server\n          - \"bad name\"\n",
                ":12:13:",
                "not a valid header name",
            ),
            (
                "    headers: {request: {set: {x-env: \" padded\"}}}\n",
                ":8:31:",
                "not a valid header value",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{route}{headers}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(at) && err.contains(why), "{headers}: {err}");
        }
    }

    #[test]
    fn upstream_h2_limits_out_of_range_name_their_line_and_column() {
        for (yaml, at, range) in [
            (
                "limits:\n  upstream_h2_streams: 0\n",
                ":6:24:",
                "1 to 10000",
            ),
            (
                "limits: {upstream_h2_connections: 5000}\n",
                ":5:35:",
                "1 to 1000",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{yaml}")).unwrap_err().to_string();
            assert!(err.contains(at) && err.contains(range), "{yaml}: {err}");
        }
        let ok = parse(&format!(
            "{MINIMAL}limits: {{upstream_h2_streams: 1000, upstream_h2_connections: 2}}\n"
        ))
        .unwrap();
        assert_eq!(
            (
                ok.limits.upstream_h2_streams,
                ok.limits.upstream_h2_connections
            ),
            (1000, 2)
        );
    }

    #[test]
    fn malformed_upstream_names_its_location() {
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [\"ftp://x\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("http://"), "{err}");
        assert!(err.contains("7:") || err.contains("line 7"), "{err}");
    }

    #[test]
    fn balancing_keys_parse_with_their_defaults() {
        let c = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\", {{url: \"h2c://127.0.0.1:2\", weight: 3}}]\n    balance: least_request\n    health: {{expect_status: \"200,204\"}}\n    retry: {{on: [reset, 503, \"504\"], budget: 2.5%}}\n  - host: b.test\n    upstreams: [\"http://127.0.0.1:3\"]\n"
        ))
        .unwrap();
        let r = &c.routes[0];
        let RouteAction::Proxy(ups) = &r.action else {
            panic!("a proxy route")
        };
        assert_eq!(ups.iter().map(|u| u.weight).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(r.balance, Balance::LeastRequest);
        let h = r.health.as_ref().unwrap();
        assert_eq!(h.kind, CheckKind::Http);
        assert_eq!(h.path, "/");
        assert_eq!(
            h.host.as_deref(),
            Some("a.test"),
            "an exact host is the check's Host"
        );
        assert!(h.expect.contains(204) && !h.expect.contains(201));
        assert_eq!(
            (h.interval, h.timeout, h.healthy_after, h.unhealthy_after),
            (Duration::from_secs(5), Duration::from_secs(2), 2, 3)
        );
        assert!(r.retry.on.has(RetryReason::Status503) && r.retry.on.has(RetryReason::Status504));
        assert!(!r.retry.on.has(RetryReason::ConnectFailure));
        assert_eq!((r.retry.attempts, r.retry.budget_permille), (1, 25));
        assert_eq!(r.passive, Passive::default());
        let d = &c.routes[1];
        assert_eq!((d.balance, d.health.clone()), (Balance::RoundRobin, None));
        assert_eq!(d.retry, Retry::default());
    }

    #[test]
    fn balancing_mistakes_name_their_line_and_what_to_do() {
        let route = |keys: &str| {
            parse(&format!(
                "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [\"http://127.0.0.1:1\"]\n{keys}"
            ))
            .unwrap_err()
            .to_string()
        };
        for (keys, want, line) in [
            ("    balance: fastest\n", "must be \"round_robin\"", ":8:"),
            (
                "    health: {expect_status: \"2xx\"}\n",
                "expect_status \"2xx\"",
                ":8:",
            ),
            (
                "    health: {kind: grpc}\n",
                "needs an h2c:// or https://",
                ":6:",
            ),
            (
                "    health: {kind: tcp, path: /x}\n",
                "applies to kind http only",
                ":6:",
            ),
            (
                "    health: {interval: 1s, timeout: 2s}\n",
                "at most health.interval",
                ":6:",
            ),
            ("    health: {unhealthy_after: 0}\n", "1 to 100", ":6:"),
            ("    retry: {on: [500]}\n", "retry.on \"500\"", ":8:"),
            (
                "    retry: {budget: 20}\n",
                "percentage like \"20%\"",
                ":8:",
            ),
            ("    retry: {attempts: 11}\n", "0 to 10", ":6:"),
            ("    passive: {ejection: 10m}\n", "at most 5m", ":6:"),
            ("    retries: 3\n", "retries", ":8:"),
        ] {
            let err = route(keys);
            assert!(err.contains(want), "{keys}: {err}");
            assert!(err.contains(line), "{keys}: want {line} in {err}");
        }
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - host: a.test\n    upstreams: [{{url: \"http://127.0.0.1:1\", weight: 0}}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("from 1 to 1000") && err.contains(":7:"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - {{host: a.test, respond: {{}}, retry: {{attempts: 2}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("routes with upstreams"), "{err}");
    }

    #[test]
    fn duplicate_host_and_path_is_an_error() {
        let err = parse(&format!(
            "{MINIMAL}routes:\n  - {{host: a.test, path: /x, upstreams: [\"http://127.0.0.1:1\"]}}\n  - {{host: A.test, path: /x/, upstreams: [\"http://127.0.0.1:2\"]}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(":7:"), "{err}");
        assert!(err.contains("repeats"), "{err}");
        // The same path spelled another way is the same route.
        for (a, b) in [("/api", "/%61pi"), ("/a%2Fb", "/a%2fb"), ("/~u", "/%7Eu")] {
            let err = parse(&format!(
                "{MINIMAL}routes:\n  - {{host: a.test, path: \"{a}\", upstreams: [\"http://127.0.0.1:1\"]}}\n  - {{host: a.test, path: \"{b}\", upstreams: [\"http://127.0.0.1:2\"]}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("repeats"), "{a} and {b}: {err}");
        }
    }

    #[test]
    fn admin_must_be_loopback_unless_public() {
        let err = parse(
            "listen: {https: \"127.0.0.1:1\", admin: \"0.0.0.0:9901\"}\ntls: {self_signed: true}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("admin_public"), "{err}");
        assert!(parse("listen: {https: \"127.0.0.1:1\", admin: \"0.0.0.0:9901\", admin_public: true}\ntls: {self_signed: true}\n").is_ok());
    }

    #[test]
    fn route_names_are_unique_and_not_numbers_and_durations_are_bounded() {
        let dup = parse(&format!(
            "{MINIMAL}routes:\n  - {{name: a, host: a.test, respond: {{}}}}\n  - {{name: a, host: b.test, respond: {{}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(dup.contains("already used"), "{dup}");
        let digits = parse(&format!(
            "{MINIMAL}routes:\n  - {{name: \"3\", host: a.test, respond: {{}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(digits.contains("digits"), "{digits}");
        // A name reaches log lines and metric labels: nothing that forges a line or a label.
        for forged in [
            "\"api\\nWARN forged\"",
            "\"api\\r\"",
            "\"a\\u001b[31m\"",
            "\"a b\"",
            "\"a/0\"",
            "\"a\\\"b\"",
            &"x".repeat(65),
        ] {
            let err = parse(&format!(
                "{MINIMAL}routes:\n  - {{name: {forged}, host: a.test, respond: {{}}}}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("name must be"), "{forged}: {err}");
            assert!(err.contains(":6:"), "points at the route: {err}");
        }
        for fine in ["api", "api-v2", "team.api:v1", "a_b+c@d"] {
            parse(&format!(
                "{MINIMAL}routes:\n  - {{name: \"{fine}\", host: a.test, respond: {{}}}}\n"
            ))
            .unwrap();
        }
        let long = parse(&format!("{MINIMAL}timeouts:\n  idle: 100000000h\n"))
            .unwrap_err()
            .to_string();
        assert!(long.contains("too long"), "{long}");
        let conns = parse(&format!(
            "{MINIMAL}limits:\n  max_connections: 99999999999\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(conns.contains("max_connections"), "{conns}");
    }

    #[test]
    fn probation_and_routes_dir_parse_with_their_defaults_and_bounds() {
        let c = parse(&format!(
            "{MINIMAL}routes_dir: ./routes.d\nreload:\n  probation: {{window: 30s}}\n"
        ))
        .unwrap();
        assert_eq!(
            c.routes_dir.as_deref(),
            Some(Path::new("/etc/limen/routes.d"))
        );
        let p = c.reload.probation.unwrap();
        assert_eq!(
            (p.window, p.min_requests, p.max_error_ratio),
            (Duration::from_secs(30), 20, 0.5)
        );
        assert!(parse(MINIMAL).unwrap().reload.probation.is_none());
        for (bad, says) in [
            ("{window: 0s}", "window"),
            ("{window: 1s, min_requests: 0}", "min_requests"),
            ("{window: 1s, max_error_ratio: 1.0}", "max_error_ratio"),
            ("{window: 1s, max_error_ratio: -0.1}", "max_error_ratio"),
            ("{min_requests: 3}", "window"),
        ] {
            let e = parse(&format!("{MINIMAL}reload:\n  probation: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(says) && e.starts_with("/etc/limen/proxy.yaml"),
                "{bad}: {e}"
            );
        }
    }
}
