//! Rendering a config as a view's text: every setting and route field as a user writes it in YAML
//! (`5s`, `[10.0.0.0/8]`, `./certs`, `kind: http, path: /`), never Rust `Debug`.
//!
//! Owns: the text of each value and the key each lands under. Must not touch: comparing views
//! (the parent module), or anything but the config it is handed; pure.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::config::{
    Balance, CheckKind, ClientAuthMode, Config, EscapedSlashes, HealthCheck, HostPattern, Limits,
    Listen, ReloadSettings, Retry, RetryReason, RouteAction, RouteHeaders, RouteSpec, Timeouts,
    TlsSettings, TlsVersion, UpstreamProtocol, UpstreamTls,
};

/// Where each key and its rendered value goes.
type Put<'a> = dyn FnMut(&str, String) + 'a;

/// A duration as written: the largest of h, m, s, ms that divides it.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_owned(),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// A string as YAML shows it: plain when that is unambiguous, else double-quoted with escapes
/// (so no control character survives).
fn scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= 512
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-' | ':' | '*' | '@' | '+')
        })
        && !matches!(s, "true" | "false" | "null" | "none" | "~");
    if plain {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| "\"?\"".to_owned())
    }
}

fn path(p: &Path, base: &Path) -> String {
    let shown = match p.strip_prefix(base) {
        Ok(rest) if !base.as_os_str().is_empty() => format!("./{}", rest.display()),
        _ => p.display().to_string(),
    };
    scalar(&shown)
}

fn list<I: IntoIterator<Item = String>>(items: I) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

// ---------------------------------------------------------------- settings

/// Every setting of `c` by its YAML key path, defaults included.
pub(super) fn settings(c: &Config, base: &Path) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        s.insert(k.to_owned(), v);
    };
    listen(&c.listen, base, &mut put);
    tls(&c.tls, base, &mut put);
    reload(&c.reload, &mut put);
    timeouts(&c.timeouts, &mut put);
    limits(&c.limits, &mut put);

    put(
        "trusted_proxies",
        list(c.trusted_proxies.iter().map(ToString::to_string)),
    );
    if let Some(w) = c.workers {
        put("workers", w.to_string());
    }
    put("access_log", c.access_log.to_string());
    put("request_id.header", c.request_id.header.to_string());
    put(
        "request_id.trust",
        match c.request_id.trust {
            crate::config::Trust::TrustedProxies => "trusted_proxies",
            crate::config::Trust::All => "all",
            crate::config::Trust::None => "none",
        }
        .to_owned(),
    );
    put(
        "allow_underscores_in_headers",
        c.allow_underscores_in_headers.to_string(),
    );
    put(
        "path_normalization.escaped_slashes",
        match c.escaped_slashes {
            EscapedSlashes::Keep => "keep",
            EscapedSlashes::Reject => "reject",
        }
        .to_owned(),
    );
    if let Some(p) = &c.routes_dir {
        put("routes_dir", path(p, base));
    }
    s
}

fn listen(l: &Listen, base: &Path, put: &mut Put) {
    put("listen.https", l.https.to_string());
    if let Some(a) = l.http {
        put("listen.http", a.to_string());
    }
    if let Some(p) = l.redirect_port {
        put("listen.redirect_port", p.to_string());
    }
    if let Some(a) = l.admin {
        put("listen.admin", a.to_string());
    }
    put("listen.admin_public", l.admin_public.to_string());
    if let Some(p) = &l.admin_token_file {
        put("listen.admin_token_file", path(p, base));
    }
    if !l.proxy_protocol_from.is_empty() {
        put(
            "listen.proxy_protocol.from",
            list(l.proxy_protocol_from.iter().map(ToString::to_string)),
        );
    }
    put(
        "listen.http_proxy_protocol",
        l.http_proxy_protocol.to_string(),
    );
    if let Some(a) = l.quic {
        put("listen.quic", a.to_string());
    }
    // Always shown: adding `quic` starts advertising HTTP/3, and the diff says so.
    put("listen.alt_svc", l.alt_svc.to_string());
    if let Some(p) = l.alt_svc_port {
        put("listen.alt_svc_port", p.to_string());
    }
}

fn tls(t: &TlsSettings, base: &Path, put: &mut Put) {
    put(
        "tls.cert_dirs",
        list(t.cert_dirs.iter().map(|p| path(p, base))),
    );
    put(
        "tls.certs",
        list(t.certs.iter().map(|p| {
            format!(
                "{{cert: {}, key: {}}}",
                path(&p.cert, base),
                path(&p.key, base)
            )
        })),
    );
    if let Some(d) = &t.default_cert {
        put("tls.default_cert", scalar(d));
    }
    put("tls.self_signed", t.self_signed.to_string());
    put(
        "tls.min_version",
        match t.min_version {
            TlsVersion::V12 => "1.2",
            TlsVersion::V13 => "1.3",
        }
        .to_owned(),
    );
    if let Some(p) = &t.ticket_keys {
        put("tls.ticket_keys", path(p, base));
    }
    put("tls.post_quantum", t.post_quantum.to_string());
    for policy in &t.client_auth {
        let key = client_auth_key(&policy.hosts);
        put(&format!("{key}.ca"), path(&policy.ca, base));
        put(
            &format!("{key}.mode"),
            match policy.mode {
                ClientAuthMode::Require => "require",
                ClientAuthMode::Optional => "optional",
            }
            .to_owned(),
        );
        put(&format!("{key}.forward"), policy.forward.to_string());
    }
}

/// `tls.client_auth[HOSTS]`, hosts sorted: a policy is known by the hosts it covers.
fn client_auth_key(hosts: &[HostPattern]) -> String {
    let mut names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
    names.sort_unstable();
    format!("tls.client_auth[{}]", names.join(", "))
}

fn reload(r: &ReloadSettings, put: &mut Put) {
    put("reload.interval", duration(r.interval));
    put("reload.verify_every", duration(r.verify_every));
    if let Some(p) = &r.probation {
        put("reload.probation.window", duration(p.window));
        put("reload.probation.min_requests", p.min_requests.to_string());
        put(
            "reload.probation.max_error_ratio",
            p.max_error_ratio.to_string(),
        );
    }
}

fn timeouts(t: &Timeouts, put: &mut Put) {
    for (k, d) in [
        ("timeouts.handshake", t.handshake),
        ("timeouts.header_read", t.header_read),
        ("timeouts.idle", t.idle),
        ("timeouts.upstream_connect", t.upstream_connect),
        ("timeouts.upstream_response", t.upstream_response),
        ("timeouts.body_idle", t.body_idle),
        ("timeouts.write_idle", t.write_idle),
        ("timeouts.shutdown_delay", t.shutdown_delay),
        ("timeouts.shutdown_grace", t.shutdown_grace),
        ("timeouts.upstream_ping_interval", t.upstream_ping_interval),
        ("timeouts.upstream_ping_timeout", t.upstream_ping_timeout),
        ("timeouts.upstream_idle", t.upstream_idle),
        ("timeouts.upstream_write", t.upstream_write),
        ("timeouts.quic_idle", t.quic_idle),
    ] {
        put(k, duration(d));
    }
}

fn limits(m: &Limits, put: &mut Put) {
    put("limits.max_header_bytes", m.max_header_bytes.to_string());
    put("limits.max_body_bytes", m.max_body_bytes.to_string());
    put("limits.max_connections", m.max_connections.to_string());
    put("limits.min_body_rate", m.min_body_rate.to_string());
    put(
        "limits.h2_max_concurrent_streams",
        m.h2_max_concurrent_streams.to_string(),
    );
    put("limits.quic_max_streams", m.quic_max_streams.to_string());
    put(
        "limits.upstream_h2_streams",
        m.upstream_h2_streams.to_string(),
    );
    put(
        "limits.upstream_h2_connections",
        m.upstream_h2_connections.to_string(),
    );
}

// ---------------------------------------------------------------- route fields

/// Every field of a route that has an effect (its place in the file and its file do not).
pub fn route_fields(spec: &RouteSpec, base: &Path) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_owned(), v);
    };
    if let Some(n) = &spec.name {
        put("name", scalar(n));
    }
    action(&spec.action, &mut put);
    put("strip_prefix", spec.strip_prefix.to_string());
    if let Some(t) = spec.timeout {
        put("timeout", duration(t));
    }
    put(
        "balance",
        match spec.balance {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequest => "least_request",
            Balance::Random => "random",
        }
        .to_owned(),
    );
    if let Some(h) = &spec.health {
        put("health", health(h));
    }
    put(
        "passive.consecutive_failures",
        spec.passive.consecutive_failures.to_string(),
    );
    put("passive.ejection", duration(spec.passive.ejection));
    retry(&spec.retry, &mut put);
    if let Some(t) = upstream_tls(&spec.upstream_tls, base) {
        put("upstream_tls", t);
    }
    if spec.upstream_tls.protocol != UpstreamProtocol::Auto {
        put(
            "upstream_protocol",
            match spec.upstream_tls.protocol {
                UpstreamProtocol::Auto => "auto",
                UpstreamProtocol::Http1 => "http1",
                UpstreamProtocol::H2 => "h2",
            }
            .to_owned(),
        );
    }
    headers(&spec.headers, &mut put);
    policy(spec, base, &mut put);
    if let Some(r) = &spec.rewrite {
        let mut parts = Vec::new();
        match &r.path {
            Some(crate::config::PathRewrite::Prefix(p)) => parts.push(format!("path_prefix: {p}")),
            Some(crate::config::PathRewrite::Regex { regex, replace }) => {
                parts.push(format!("path_regex: {}", scalar(regex.as_str())));
                parts.push(format!("replace: {}", scalar(replace)));
            }
            None => {}
        }
        if let Some(h) = &r.host {
            parts.push(format!("host: {h}"));
        }
        put("rewrite", parts.join(", "));
    }
    if let Some(c) = &spec.compress {
        let algorithms: Vec<&str> = c.algorithms.iter().map(|a| a.token()).collect();
        let mut parts = vec![
            format!("algorithms: [{}]", algorithms.join(", ")),
            format!("min_bytes: {}", c.min_bytes),
        ];
        let default_types = c
            .types
            .iter()
            .map(String::as_str)
            .eq(crate::config::DEFAULT_TYPES.iter().copied());
        if !default_types {
            parts.push(format!("types: [{}]", c.types.join(", ")));
        }
        put("compress", parts.join(", "));
    }
    f
}

/// `access`, `rate_limit` and `auth`: what they say, never a secret (the users file is named,
/// not shown).
fn policy(spec: &RouteSpec, base: &Path, put: &mut Put) {
    if let Some(a) = &spec.access {
        let blocks = |s: &crate::config::IpSet| list(s.blocks.iter().map(ToString::to_string));
        let mut parts = Vec::new();
        if let Some(allow) = &a.allow {
            parts.push(format!("allow: {}", blocks(allow)));
        }
        if !a.deny.blocks.is_empty() {
            parts.push(format!("deny: {}", blocks(&a.deny)));
        }
        put("access", parts.join(", "));
    }
    if let Some(r) = &spec.rate_limit {
        let unit = match r.rate.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        let key = match &r.key {
            crate::config::RateKey::Client => "client".to_owned(),
            crate::config::RateKey::Header(h) => format!("header:{h}"),
        };
        put(
            "rate_limit",
            format!(
                "rate: {}/{unit}, burst: {}, key: {key}, max_keys: {}",
                r.rate.count, r.burst, r.max_keys
            ),
        );
    }
    match &spec.auth {
        None => {}
        Some(crate::config::Auth::Basic(b)) => put(
            "auth",
            format!(
                "basic: users_file: {}, realm: {}",
                path(&b.users_file, base),
                scalar(&b.realm)
            ),
        ),
        Some(crate::config::Auth::Forward(f)) => {
            let names = |v: &[http::HeaderName]| list(v.iter().map(ToString::to_string));
            let mut text = format!(
                "forward: url: {}{}, request_headers: {}, response_headers: {}, timeout: {}",
                f.upstream,
                scalar(&f.path),
                names(&f.request_headers),
                names(&f.response_headers),
                duration(f.timeout)
            );
            if let Some(t) = upstream_tls(&f.upstream_tls, base) {
                text.push_str(&format!(", upstream_tls: {t}"));
            }
            put("auth", text);
        }
    }
}

/// `upstreams` (with each weight but 1) or `respond` (status, then the body's start).
fn action(a: &RouteAction, put: &mut Put) {
    match a {
        RouteAction::Proxy(ups) => put(
            "upstreams",
            ups.iter()
                .map(|u| match u.weight {
                    1 => u.url.to_string(),
                    w => format!("{} (weight {w})", u.url),
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        RouteAction::Redirect(r) => put(
            "redirect",
            format!("{} {}", r.status.as_u16(), scalar(&r.to)),
        ),
        RouteAction::Respond { status, body } => put(
            "respond",
            if body.is_empty() {
                status.as_u16().to_string()
            } else {
                let cut: String = body.chars().take(100).collect();
                let more = if cut.len() < body.len() { "…" } else { "" };
                format!("{} {}{more}", status.as_u16(), scalar(&cut))
            },
        ),
    }
}

fn retry(r: &Retry, put: &mut Put) {
    put("retry.attempts", r.attempts.to_string());
    put(
        "retry.on",
        list(
            RetryReason::ALL
                .into_iter()
                .filter(|reason| r.on.has(*reason))
                .map(|reason| reason.as_str().to_owned()),
        ),
    );
    let b = r.budget_permille;
    put(
        "retry.budget",
        if b % 10 == 0 {
            format!("{}%", b / 10)
        } else {
            format!("{}.{}%", b / 10, b % 10)
        },
    );
}

fn headers(h: &RouteHeaders, put: &mut Put) {
    for (side, edits) in [("request", &h.request), ("response", &h.response)] {
        if !edits.set.is_empty() {
            put(
                &format!("headers.{side}.set"),
                list(edits.set.iter().map(|(n, v)| {
                    format!("{}: {}", n, scalar(&String::from_utf8_lossy(v.as_bytes())))
                })),
            );
        }
        if !edits.remove.is_empty() {
            put(
                &format!("headers.{side}.remove"),
                list(edits.remove.iter().map(ToString::to_string)),
            );
        }
    }
}

/// `health`, as the inside of the flow mapping a user writes.
fn health(h: &HealthCheck) -> String {
    let kind = match h.kind {
        CheckKind::Http => "http",
        CheckKind::Tcp => "tcp",
        CheckKind::Grpc => "grpc",
    };
    let mut parts = vec![format!("kind: {kind}")];
    if h.kind == CheckKind::Http {
        parts.push(format!("path: {}", scalar(&h.path)));
        if let Some(host) = &h.host {
            parts.push(format!("host: {}", scalar(host)));
        }
        parts.push(format!("expect_status: {}", scalar(&h.expect.to_string())));
    }
    parts.extend([
        format!("interval: {}", duration(h.interval)),
        format!("timeout: {}", duration(h.timeout)),
        format!("healthy_after: {}", h.healthy_after),
        format!("unhealthy_after: {}", h.unhealthy_after),
    ]);
    parts.join(", ")
}

/// `upstream_tls`, as the inside of its flow mapping; None when nothing of it is set.
fn upstream_tls(t: &UpstreamTls, base: &Path) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(ca) = &t.ca {
        parts.push(format!("ca: {}", path(ca, base)));
    }
    if let Some(n) = &t.server_name {
        parts.push(format!("server_name: {}", scalar(n)));
    }
    if let Some((cert, key)) = &t.client {
        parts.push(format!("client_cert: {}", path(cert, base)));
        parts.push(format!("client_key: {}", path(key, base)));
    }
    if t.insecure_skip_verify {
        parts.push("insecure_skip_verify: true".to_owned());
    }
    if !t.post_quantum {
        parts.push("post_quantum: false".to_owned());
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}
