//! The typed config diff: what a config says, flattened to key paths and values as a user writes
//! them in YAML (a [`View`]), and the [`Change`]s from one view to another.
//!
//! Owns: which keys have an effect, how each value is rendered, which changes apply to new
//! connections only or need a restart, and the one-line summary of a reload. Pure: must not touch
//! files, sockets or the published snapshot; certificates and secret fingerprints are handed in by
//! the caller (`--check --diff` from the candidate it loaded, `/status.json` from the snapshot).
//! A secret's content never enters a view: only a fingerprint of it ([`fingerprint`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::{
    Config, EscapedSlashes, HealthCheck, IpBlock, RetryReason, RouteAction, RouteSpec, TlsVersion,
    UpstreamProtocol, UpstreamTls,
};

/// A route's identity: its host pattern and path prefix, as written.
pub type RouteKey = (String, String);

/// Everything in a config that has an effect, flattened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// By YAML key path (`timeouts.idle`, `tls.client_auth[a.test].mode`): the value in force,
    /// defaults included. An optional key that is not set is absent.
    pub settings: BTreeMap<String, String>,
    /// By (host, path): each field of the route (`upstreams`, `retry.attempts`, …). Optional
    /// fields that are not set are absent.
    pub routes: BTreeMap<RouteKey, BTreeMap<String, String>>,
    /// By the certificate's names, sorted and joined with `,`.
    pub certs: BTreeMap<String, CertView>,
    /// By the key of the setting that names the file (`tls.ticket_keys`): a fingerprint of the
    /// content in force, never the content. Compared only where both views have the key.
    pub secrets: BTreeMap<String, String>,
}

/// A certificate as the diff sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertView {
    /// Its names, sorted, joined with `,`, as printed.
    pub names: String,
    /// RFC 3339.
    pub not_after: Option<String>,
    /// SHA-256 of the leaf (hex): decides a replacement when both sides have it.
    pub sha256: Option<String>,
}

/// The setting keys a view can hold, besides `tls.client_auth[HOSTS].{ca,mode,forward}`.
pub const SETTING_KEYS: &[&str] = &[
    "listen.https",
    "listen.http",
    "listen.redirect_port",
    "listen.admin",
    "listen.admin_public",
    "listen.admin_token_file",
    "listen.proxy_protocol.from",
    "listen.http_proxy_protocol",
    "tls.cert_dirs",
    "tls.certs",
    "tls.default_cert",
    "tls.self_signed",
    "tls.min_version",
    "tls.ticket_keys",
    "reload.interval",
    "reload.verify_every",
    "reload.probation.window",
    "reload.probation.min_requests",
    "reload.probation.max_error_ratio",
    "timeouts.handshake",
    "timeouts.header_read",
    "timeouts.idle",
    "timeouts.upstream_connect",
    "timeouts.upstream_response",
    "timeouts.body_idle",
    "timeouts.write_idle",
    "timeouts.shutdown_delay",
    "timeouts.shutdown_grace",
    "timeouts.upstream_ping_interval",
    "timeouts.upstream_ping_timeout",
    "timeouts.upstream_idle",
    "limits.max_header_bytes",
    "limits.max_body_bytes",
    "limits.max_connections",
    "limits.min_body_rate",
    "limits.h2_max_concurrent_streams",
    "trusted_proxies",
    "workers",
    "access_log",
    "allow_underscores_in_headers",
    "path_normalization.escaped_slashes",
    "routes_dir",
];

/// The fields a route can hold.
pub const ROUTE_FIELDS: &[&str] = &[
    "name",
    "upstreams",
    "respond",
    "strip_prefix",
    "timeout",
    "balance",
    "health",
    "passive.consecutive_failures",
    "passive.ejection",
    "retry.attempts",
    "retry.on",
    "retry.budget",
    "upstream_tls",
    "upstream_protocol",
    "headers.request.set",
    "headers.request.remove",
    "headers.response.set",
    "headers.response.remove",
];

/// Keys whose change this process cannot apply: the next restart does.
const RESTART_KEYS: &[&str] = &["workers"];

/// Whether `key` is one this version renders (so a view from elsewhere can be filtered to it).
pub fn is_setting_key(key: &str) -> bool {
    SETTING_KEYS.contains(&key)
        || key.strip_prefix("tls.client_auth[").is_some_and(|rest| {
            ["].ca", "].mode", "].forward"]
                .iter()
                .any(|end| rest.ends_with(end) && rest.len() > end.len())
        })
}

/// Whether `field` is a route field this version renders.
pub fn is_route_field(field: &str) -> bool {
    ROUTE_FIELDS.contains(&field)
}

/// The fingerprint of a secret's content: the first 16 hex digits of its SHA-256.
pub fn fingerprint(content: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, content);
    crate::tls::hex(&d.as_ref()[..8])
}

/// Whether a change of `key` reaches only connections accepted (or handshakes made) after it:
/// listeners, everything TLS, PROXY protocol, and the limits and timeouts read at accept.
fn new_connections_only(key: &str) -> bool {
    key.starts_with("tls.")
        || matches!(
            key,
            "listen.https"
                | "listen.http"
                | "listen.admin"
                | "listen.proxy_protocol.from"
                | "listen.http_proxy_protocol"
                | "timeouts.handshake"
                | "timeouts.header_read"
                | "timeouts.idle"
                | "timeouts.write_idle"
                | "limits.max_header_bytes"
                | "limits.h2_max_concurrent_streams"
                | "limits.max_connections"
        )
}

impl View {
    /// The settings and routes of `config`. Paths under the config file's folder are shown as
    /// written beside it (`./certs`), so a candidate checked elsewhere compares as if shipped.
    pub fn from_config(config: &Config) -> View {
        let base = config.source.parent().unwrap_or(Path::new(""));
        let mut v = View {
            settings: settings(config, base),
            ..View::default()
        };
        for spec in &config.routes {
            v.routes
                .entry((spec.host.to_string(), spec.path.clone()))
                .or_insert_with(|| route_fields(spec, base));
        }
        v
    }

    /// The routes alone (a routes_dir file's), rendered as `from_config` renders a config's.
    pub fn from_routes(specs: &[RouteSpec], base: &Path) -> View {
        let mut v = View::default();
        for spec in specs {
            v.routes
                .entry((spec.host.to_string(), spec.path.clone()))
                .or_insert_with(|| route_fields(spec, base));
        }
        v
    }

    /// Adds a certificate. The first of two with the same names wins.
    pub fn add_cert(&mut self, names: &[&str], not_after: Option<String>, sha256: Option<String>) {
        if names.is_empty() {
            return;
        }
        let mut sorted = names.to_vec();
        sorted.sort_unstable();
        let key = sorted.join(",");
        self.certs.entry(key.clone()).or_insert(CertView {
            names: key,
            not_after,
            sha256,
        });
    }

    /// Adds every certificate of `store`.
    pub fn add_certs(&mut self, store: &crate::tls::CertStore) {
        for c in store.certs() {
            let names: Vec<&str> = c.names.iter().map(String::as_str).collect();
            self.add_cert(&names, Some(rfc3339(c.not_after)), Some(c.sha256.clone()));
        }
    }
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- rendering

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

fn block(b: &IpBlock) -> String {
    let max = if b.net.is_ipv4() { 32 } else { 128 };
    if b.prefix == max {
        b.net.to_string()
    } else {
        format!("{}/{}", b.net, b.prefix)
    }
}

fn settings(c: &Config, base: &Path) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        s.insert(k.to_owned(), v);
    };
    let l = &c.listen;
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
            list(l.proxy_protocol_from.iter().map(block)),
        );
    }
    put(
        "listen.http_proxy_protocol",
        l.http_proxy_protocol.to_string(),
    );

    let t = &c.tls;
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
    for policy in &t.client_auth {
        let key = client_auth_key(&policy.hosts);
        put(&format!("{key}.ca"), path(&policy.ca, base));
        put(
            &format!("{key}.mode"),
            match policy.mode {
                super::ClientAuthMode::Require => "require",
                super::ClientAuthMode::Optional => "optional",
            }
            .to_owned(),
        );
        put(&format!("{key}.forward"), policy.forward.to_string());
    }

    let r = &c.reload;
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

    let t = &c.timeouts;
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
    ] {
        put(k, duration(d));
    }

    let m = &c.limits;
    put("limits.max_header_bytes", m.max_header_bytes.to_string());
    put("limits.max_body_bytes", m.max_body_bytes.to_string());
    put("limits.max_connections", m.max_connections.to_string());
    put("limits.min_body_rate", m.min_body_rate.to_string());
    put(
        "limits.h2_max_concurrent_streams",
        m.h2_max_concurrent_streams.to_string(),
    );

    put("trusted_proxies", list(c.trusted_proxies.iter().map(block)));
    if let Some(w) = c.workers {
        put("workers", w.to_string());
    }
    put("access_log", c.access_log.to_string());
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

/// `tls.client_auth[HOSTS]`, hosts sorted: a policy is known by the hosts it covers.
fn client_auth_key(hosts: &[super::HostPattern]) -> String {
    let mut names: Vec<String> = hosts.iter().map(ToString::to_string).collect();
    names.sort_unstable();
    format!("tls.client_auth[{}]", names.join(", "))
}

/// Every field of a route that has an effect (its place in the file and its file do not).
pub fn route_fields(spec: &RouteSpec, base: &Path) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_owned(), v);
    };
    if let Some(n) = &spec.name {
        put("name", scalar(n));
    }
    match &spec.action {
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
    put("strip_prefix", spec.strip_prefix.to_string());
    if let Some(t) = spec.timeout {
        put("timeout", duration(t));
    }
    put(
        "balance",
        match spec.balance {
            super::Balance::RoundRobin => "round_robin",
            super::Balance::LeastRequest => "least_request",
            super::Balance::Random => "random",
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
    put("retry.attempts", spec.retry.attempts.to_string());
    put(
        "retry.on",
        list(
            RetryReason::ALL
                .into_iter()
                .filter(|r| spec.retry.on.has(*r))
                .map(|r| r.as_str().to_owned()),
        ),
    );
    let b = spec.retry.budget_permille;
    put(
        "retry.budget",
        if b % 10 == 0 {
            format!("{}%", b / 10)
        } else {
            format!("{}.{}%", b / 10, b % 10)
        },
    );
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
    for (side, edits) in [
        ("request", &spec.headers.request),
        ("response", &spec.headers.response),
    ] {
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
    f
}

/// `health`, as the inside of the flow mapping a user writes.
fn health(h: &HealthCheck) -> String {
    let kind = match h.kind {
        super::CheckKind::Http => "http",
        super::CheckKind::Tcp => "tcp",
        super::CheckKind::Grpc => "grpc",
    };
    let mut parts = vec![format!("kind: {kind}")];
    if h.kind == super::CheckKind::Http {
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
    (!parts.is_empty()).then(|| parts.join(", "))
}

// ---------------------------------------------------------------- changes

/// One difference between two views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    SettingAdded {
        key: String,
        value: String,
    },
    SettingRemoved {
        key: String,
        value: String,
    },
    SettingChanged {
        key: String,
        old: String,
        new: String,
    },
    /// The content of the file a setting names changed (the setting itself did not).
    SecretChanged {
        key: String,
    },
    /// A key this process cannot apply (`workers`): it needs a restart.
    Restart {
        key: String,
    },
    RouteAdded {
        host: String,
        path: String,
        /// Where it sends traffic: its upstreams, or `respond STATUS`.
        target: String,
    },
    RouteRemoved {
        host: String,
        path: String,
    },
    /// A field of a route; None: not set on that side.
    RouteChanged {
        host: String,
        path: String,
        field: String,
        old: Option<String>,
        new: Option<String>,
    },
    CertAdded {
        names: String,
        not_after: Option<String>,
    },
    CertRemoved {
        names: String,
    },
    CertReplaced {
        names: String,
        old_not_after: Option<String>,
        new_not_after: Option<String>,
    },
}

impl Change {
    /// Whether the change reaches only connections accepted (or TLS handshakes made) after it
    /// is applied; existing connections keep what they started with. Certificates count too
    /// (they are chosen at the handshake), although their lines carry no suffix.
    pub fn new_connections_only(&self) -> bool {
        match self {
            Change::SettingAdded { key, .. }
            | Change::SettingRemoved { key, .. }
            | Change::SettingChanged { key, .. }
            | Change::SecretChanged { key } => new_connections_only(key),
            Change::CertAdded { .. } | Change::CertRemoved { .. } | Change::CertReplaced { .. } => {
                true
            }
            Change::Restart { .. }
            | Change::RouteAdded { .. }
            | Change::RouteRemoved { .. }
            | Change::RouteChanged { .. } => false,
        }
    }

    /// Whether the change waits for a restart.
    pub fn needs_restart(&self) -> bool {
        matches!(self, Change::Restart { .. })
    }

    /// The setting key it concerns, if it is a setting, secret or restart change.
    pub fn key(&self) -> Option<&str> {
        match self {
            Change::SettingAdded { key, .. }
            | Change::SettingRemoved { key, .. }
            | Change::SettingChanged { key, .. }
            | Change::SecretChanged { key }
            | Change::Restart { key } => Some(key),
            _ => None,
        }
    }

    /// The (host, path) of the route it concerns, if any.
    pub fn route(&self) -> Option<(&str, &str)> {
        match self {
            Change::RouteAdded { host, path, .. }
            | Change::RouteRemoved { host, path }
            | Change::RouteChanged { host, path, .. } => Some((host, path)),
            _ => None,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".to_owned());
        match self {
            Change::SettingAdded { key, value } => write!(f, "+ {key}: {value}")?,
            Change::SettingRemoved { key, value } => write!(f, "- {key}: {value}")?,
            Change::SettingChanged { key, old, new } => write!(f, "~ {key}: {old} -> {new}")?,
            Change::SecretChanged { key } => write!(f, "~ {key}: (changed)")?,
            Change::Restart { key } => return write!(f, "! {key} needs a restart"),
            Change::RouteAdded { host, path, target } => {
                return write!(f, "+ route {host} {path} -> {target}")
            }
            Change::RouteRemoved { host, path } => return write!(f, "- route {host} {path}"),
            Change::RouteChanged {
                host,
                path,
                field,
                old,
                new,
            } => {
                return write!(
                    f,
                    "~ route {host} {path}: {field} ({} -> {})",
                    or_none(old),
                    or_none(new)
                )
            }
            Change::CertAdded { names, not_after } => {
                return write!(f, "+ cert {names} (not after {})", or_none(not_after))
            }
            Change::CertRemoved { names } => return write!(f, "- cert {names}"),
            Change::CertReplaced {
                names,
                old_not_after,
                new_not_after,
            } => {
                return write!(
                    f,
                    "~ cert {names} (not after {} -> {})",
                    or_none(old_not_after),
                    or_none(new_not_after)
                )
            }
        }
        if self.new_connections_only() {
            f.write_str(" [new connections only]")?;
        }
        Ok(())
    }
}

/// The changes from `old` to `new`, sorted by their lines and without duplicates.
pub fn diff(old: &View, new: &View) -> Vec<Change> {
    let mut out = Vec::new();
    let setting = |key: &str, change: Change| {
        if RESTART_KEYS.contains(&key) {
            Change::Restart {
                key: key.to_owned(),
            }
        } else {
            change
        }
    };
    for (key, value) in &old.settings {
        match new.settings.get(key) {
            None => out.push(setting(
                key,
                Change::SettingRemoved {
                    key: key.clone(),
                    value: value.clone(),
                },
            )),
            Some(n) if n != value => out.push(setting(
                key,
                Change::SettingChanged {
                    key: key.clone(),
                    old: value.clone(),
                    new: n.clone(),
                },
            )),
            Some(_) => {}
        }
    }
    for (key, value) in &new.settings {
        if !old.settings.contains_key(key) {
            out.push(setting(
                key,
                Change::SettingAdded {
                    key: key.clone(),
                    value: value.clone(),
                },
            ));
        }
    }
    // A secret is compared where both sides know it, and only when the setting naming its file
    // did not change (that line already says it is another file).
    for (key, fp) in &old.secrets {
        if new.secrets.get(key).is_some_and(|n| n != fp)
            && old.settings.get(key) == new.settings.get(key)
        {
            out.push(Change::SecretChanged { key: key.clone() });
        }
    }
    diff_routes(old, new, &mut out);
    diff_certs(old, new, &mut out);
    let mut keyed: Vec<(String, Change)> = out.into_iter().map(|c| (c.to_string(), c)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.dedup_by(|a, b| a.0 == b.0);
    keyed.into_iter().map(|(_, c)| c).collect()
}

fn diff_routes(old: &View, new: &View, out: &mut Vec<Change>) {
    for (host, path) in old.routes.keys().filter(|k| !new.routes.contains_key(*k)) {
        out.push(Change::RouteRemoved {
            host: host.clone(),
            path: path.clone(),
        });
    }
    for ((host, path), n) in &new.routes {
        let Some(o) = old.routes.get(&(host.clone(), path.clone())) else {
            let target = match (n.get("upstreams"), n.get("respond")) {
                (Some(u), _) => u.clone(),
                (None, Some(r)) => format!("respond {r}"),
                (None, None) => "none".to_owned(),
            };
            out.push(Change::RouteAdded {
                host: host.clone(),
                path: path.clone(),
                target,
            });
            continue;
        };
        let fields: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
        for field in fields {
            let (ov, nv) = (o.get(field), n.get(field));
            if ov != nv {
                out.push(Change::RouteChanged {
                    host: host.clone(),
                    path: path.clone(),
                    field: field.clone(),
                    old: ov.cloned(),
                    new: nv.cloned(),
                });
            }
        }
    }
}

fn diff_certs(old: &View, new: &View, out: &mut Vec<Change>) {
    for (key, c) in &old.certs {
        if !new.certs.contains_key(key) {
            out.push(Change::CertRemoved {
                names: c.names.clone(),
            });
        }
    }
    for (key, n) in &new.certs {
        match old.certs.get(key) {
            None => out.push(Change::CertAdded {
                names: n.names.clone(),
                not_after: n.not_after.clone(),
            }),
            Some(o) if replaced(o, n) => out.push(Change::CertReplaced {
                names: n.names.clone(),
                old_not_after: o.not_after.clone(),
                new_not_after: n.not_after.clone(),
            }),
            Some(_) => {}
        }
    }
}

/// The fingerprint decides when both sides have one: a renewal can keep the same expiry, and
/// the same file re-read is not a change. Without it, a new expiry is the best evidence left.
fn replaced(old: &CertView, new: &CertView) -> bool {
    match (&old.sha256, &new.sha256) {
        (Some(a), Some(b)) => !a.eq_ignore_ascii_case(b),
        _ => matches!((&old.not_after, &new.not_after), (Some(a), Some(b)) if a != b),
    }
}

/// Longest list of other keys a summary names.
const SUMMARY_CHARS: usize = 160;

/// One line for logs and the reload history: `routes +A -R ~C` (routes added, removed, changed),
/// then, after `; `, the other keys that changed (names only, `certs` for certificates), cut
/// with `(+N more)` past a bound.
pub fn summary(changes: &[Change]) -> String {
    let count = |f: fn(&Change) -> bool| {
        changes
            .iter()
            .filter(|c| f(c))
            .filter_map(Change::route)
            .collect::<BTreeSet<_>>()
            .len()
    };
    let added = count(|c| matches!(c, Change::RouteAdded { .. }));
    let removed = count(|c| matches!(c, Change::RouteRemoved { .. }));
    let changed = count(|c| matches!(c, Change::RouteChanged { .. }));
    let mut line = format!("routes +{added} -{removed} ~{changed}");
    let mut others: Vec<&str> = Vec::new();
    for c in changes {
        let name = match c {
            Change::CertAdded { .. } | Change::CertRemoved { .. } | Change::CertReplaced { .. } => {
                "certs"
            }
            other => match other.key() {
                Some(k) => k,
                None => continue,
            },
        };
        if !others.contains(&name) {
            others.push(name);
        }
    }
    let mut shown = 0;
    for (i, name) in others.iter().enumerate() {
        let extra = name.chars().count() + 2;
        if i > 0 && shown + extra > SUMMARY_CHARS {
            line.push_str(&format!(" (+{} more)", others.len() - i));
            break;
        }
        line.push_str(if i == 0 { "; " } else { ", " });
        line.extend(name.chars().take(SUMMARY_CHARS));
        shown += extra;
    }
    line
}

/// The (host, path) of the routes added or changed, sorted: what `reload.probation` judges.
pub fn routes_touched(changes: &[Change]) -> Vec<RouteKey> {
    changes
        .iter()
        .filter(|c| matches!(c, Change::RouteAdded { .. } | Change::RouteChanged { .. }))
        .filter_map(Change::route)
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        match Config::parse(yaml, Path::new("/etc/limen/proxy.yaml")) {
            Ok(c) => c,
            Err(e) => panic!("{e}\n{yaml}"),
        }
    }

    const BASE: &str = "listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  cert_dirs: [./certs]\nroutes:\n  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]}\n  - {host: a.test, respond: {status: 410}}\n";

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(
            &View::from_config(&config(old)),
            &View::from_config(&config(new)),
        )
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    #[test]
    fn identical_configs_have_no_changes() {
        assert!(lines(BASE, BASE).is_empty());
        let v = View::from_config(&config(BASE));
        assert!(diff(&v, &v).is_empty());
        assert!(diff(&View::default(), &View::default()).is_empty());
    }

    #[test]
    fn values_read_as_yaml_not_debug() {
        let v = View::from_config(&config(BASE));
        let s = &v.settings;
        assert_eq!(s["listen.https"], "127.0.0.1:8443");
        assert_eq!(s["timeouts.idle"], "1m");
        assert_eq!(s["timeouts.shutdown_delay"], "0s");
        assert_eq!(s["reload.interval"], "5s");
        assert_eq!(s["tls.cert_dirs"], "[./certs]");
        assert_eq!(s["trusted_proxies"], "[]");
        assert_eq!(s["access_log"], "true");
        assert_eq!(s["tls.min_version"], "1.2");
        assert!(!s.contains_key("listen.http") && !s.contains_key("workers"));
        let api = &v.routes[&("a.test".to_owned(), "/api".to_owned())];
        assert_eq!(api["retry.on"], "[connect_failure]");
        assert_eq!(api["retry.budget"], "20%");
        assert_eq!(api["passive.ejection"], "30s");
        assert_eq!(api["upstreams"], "http://127.0.0.1:9");
        for (k, val) in s.iter().chain(api.iter()) {
            assert!(
                !val.contains("Some(") && !val.contains("Duration") && !val.contains("{ "),
                "{k}: {val}"
            );
            assert!(is_setting_key(k) || is_route_field(k), "{k} is listed");
        }
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration(Duration::from_secs(7200)), "2h");
    }

    /// Every key, changed one at a time, gives exactly one line, and that line names it.
    #[test]
    fn each_key_changed_alone_gives_one_line_naming_it() {
        let listen = "listen:\n  https: \"127.0.0.1:8443\"\n";
        let rest = "tls:\n  cert_dirs: [./certs]\nroutes:\n  - {name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]}\n";
        let with = |listen_extra: &str, tls_extra: &str, top: &str| {
            format!(
                "{listen}{listen_extra}tls:\n  cert_dirs: [./certs]\n{tls_extra}{top}routes:\n  - {{name: api, host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]}}\n"
            )
        };
        let base = format!("{listen}{rest}");
        assert_eq!(with("", "", ""), base);
        let cases: Vec<(String, &str, &str)> = vec![
            (
                with("  http: \"127.0.0.1:8080\"\n", "", ""),
                "+ listen.http: 127.0.0.1:8080 [new connections only]",
                "listen.http",
            ),
            (
                with("  redirect_port: 443\n", "", ""),
                "+ listen.redirect_port: 443",
                "listen.redirect_port",
            ),
            (
                with("  admin: \"127.0.0.1:9901\"\n", "", ""),
                "+ listen.admin: 127.0.0.1:9901 [new connections only]",
                "listen.admin",
            ),
            (
                with("  admin_public: true\n", "", ""),
                "~ listen.admin_public: false -> true",
                "listen.admin_public",
            ),
            (
                with("  admin_token_file: ./token\n", "", ""),
                "+ listen.admin_token_file: ./token",
                "listen.admin_token_file",
            ),
            (
                with(
                    "  proxy_protocol: {from: [10.0.0.0/8, 192.0.2.1]}\n",
                    "",
                    "",
                ),
                "+ listen.proxy_protocol.from: [10.0.0.0/8, 192.0.2.1] [new connections only]",
                "listen.proxy_protocol.from",
            ),
            (
                with("", "  certs: [{cert: ./a.pem, key: /k/a.key}]\n", ""),
                "~ tls.certs: [] -> [{cert: ./a.pem, key: /k/a.key}] [new connections only]",
                "tls.certs",
            ),
            (
                with("", "  default_cert: a.test\n", ""),
                "+ tls.default_cert: a.test [new connections only]",
                "tls.default_cert",
            ),
            (
                with("", "  self_signed: true\n", ""),
                "~ tls.self_signed: false -> true [new connections only]",
                "tls.self_signed",
            ),
            (
                with("", "  min_version: \"1.3\"\n", ""),
                "~ tls.min_version: 1.2 -> 1.3 [new connections only]",
                "tls.min_version",
            ),
            (
                with("", "  ticket_keys: ./tickets\n", ""),
                "+ tls.ticket_keys: ./tickets [new connections only]",
                "tls.ticket_keys",
            ),
            (
                with("", "", "reload:\n  interval: 250ms\n"),
                "~ reload.interval: 5s -> 250ms",
                "reload.interval",
            ),
            (
                with("", "", "reload:\n  verify_every: 2m\n"),
                "~ reload.verify_every: 1m -> 2m",
                "reload.verify_every",
            ),
            (
                with("", "", "timeouts:\n  idle: 30s\n"),
                "~ timeouts.idle: 1m -> 30s [new connections only]",
                "timeouts.idle",
            ),
            (
                with("", "", "timeouts:\n  upstream_response: 90s\n"),
                "~ timeouts.upstream_response: 1m -> 90s",
                "timeouts.upstream_response",
            ),
            (
                with("", "", "timeouts:\n  shutdown_grace: 1h\n"),
                "~ timeouts.shutdown_grace: 30s -> 1h",
                "timeouts.shutdown_grace",
            ),
            (
                with("", "", "limits:\n  max_connections: 20\n"),
                "~ limits.max_connections: 10000 -> 20 [new connections only]",
                "limits.max_connections",
            ),
            (
                with("", "", "limits:\n  max_body_bytes: 1024\n"),
                "~ limits.max_body_bytes: 0 -> 1024",
                "limits.max_body_bytes",
            ),
            (
                with("", "", "trusted_proxies: [10.0.0.1, \"fd00::/8\"]\n"),
                "~ trusted_proxies: [] -> [10.0.0.1, fd00::/8]",
                "trusted_proxies",
            ),
            (
                with("", "", "workers: 2\n"),
                "! workers needs a restart",
                "workers",
            ),
            (
                with("", "", "access_log: false\n"),
                "~ access_log: true -> false",
                "access_log",
            ),
            (
                with("", "", "allow_underscores_in_headers: true\n"),
                "~ allow_underscores_in_headers: false -> true",
                "allow_underscores_in_headers",
            ),
            (
                with("", "", "path_normalization: {escaped_slashes: reject}\n"),
                "~ path_normalization.escaped_slashes: keep -> reject",
                "path_normalization.escaped_slashes",
            ),
            (
                with("", "", "routes_dir: ./routes.d\n"),
                "+ routes_dir: ./routes.d",
                "routes_dir",
            ),
        ];
        let mut seen = BTreeSet::new();
        for (yaml, want, key) in &cases {
            assert_eq!(lines(&base, yaml), [*want], "{key}");
            seen.insert(key.to_string());
        }
        // Keys that need another key beside them, or that repeat a kind covered above.
        let timeouts = [
            "handshake",
            "header_read",
            "upstream_connect",
            "body_idle",
            "write_idle",
            "shutdown_delay",
            "upstream_ping_interval",
            "upstream_ping_timeout",
            "upstream_idle",
        ];
        for t in timeouts {
            let yaml = with("", "", &format!("timeouts:\n  {t}: 7s\n"));
            let out = lines(&base, &yaml);
            assert_eq!(out.len(), 1, "{t}: {out:?}");
            assert!(out[0].starts_with(&format!("~ timeouts.{t}: ")), "{out:?}");
            seen.insert(format!("timeouts.{t}"));
        }
        for (l, v) in [
            ("max_header_bytes", "2048"),
            ("min_body_rate", "1"),
            ("h2_max_concurrent_streams", "7"),
        ] {
            let yaml = with("", "", &format!("limits:\n  {l}: {v}\n"));
            let out = lines(&base, &yaml);
            assert_eq!(out.len(), 1, "{l}: {out:?}");
            assert!(out[0].starts_with(&format!("~ limits.{l}: ")), "{out:?}");
            seen.insert(format!("limits.{l}"));
        }
        let moved = base.replace("8443", "9443");
        assert_eq!(
            lines(&base, &moved),
            ["~ listen.https: 127.0.0.1:8443 -> 127.0.0.1:9443 [new connections only]"]
        );
        seen.insert("listen.https".into());
        let dirs = base.replace("[./certs]", "[./certs, /srv/certs]");
        assert_eq!(
            lines(&base, &dirs),
            ["~ tls.cert_dirs: [./certs] -> [./certs, /srv/certs] [new connections only]"]
        );
        seen.insert("tls.cert_dirs".into());
        let pp = with("  proxy_protocol: {from: [10.0.0.0/8]}\n", "", "");
        let both = with(
            "  proxy_protocol: {from: [10.0.0.0/8]}\n  http: \"127.0.0.1:80\"\n",
            "",
            "",
        );
        let hpp = with(
            "  proxy_protocol: {from: [10.0.0.0/8]}\n  http: \"127.0.0.1:80\"\n  http_proxy_protocol: true\n",
            "",
            "",
        );
        assert_eq!(
            lines(&both, &hpp),
            ["~ listen.http_proxy_protocol: false -> true [new connections only]"]
        );
        assert_eq!(lines(&pp, &both).len(), 1);
        seen.insert("listen.http_proxy_protocol".into());
        let prob = with("", "", "reload:\n  probation: {window: 30s}\n");
        for (k, v) in [
            ("window", "{window: 1m}"),
            ("min_requests", "{window: 30s, min_requests: 5}"),
            ("max_error_ratio", "{window: 30s, max_error_ratio: 0.25}"),
        ] {
            let yaml = with("", "", &format!("reload:\n  probation: {v}\n"));
            let out = lines(&prob, &yaml);
            assert_eq!(out.len(), 1, "{k}: {out:?}");
            assert!(
                out[0].starts_with(&format!("~ reload.probation.{k}: ")),
                "{out:?}"
            );
            seen.insert(format!("reload.probation.{k}"));
        }
        for k in SETTING_KEYS {
            assert!(seen.contains(*k), "{k} is not covered");
        }

        // tls.client_auth: each field of a policy, keyed by its hosts.
        let ca = |extra: &str| {
            with(
                "",
                &format!(
                    "  client_auth:\n    - {{hosts: [b.test, a.test], ca: ./ca.pem{extra}}}\n"
                ),
                "",
            )
        };
        assert_eq!(
            lines(&ca(""), &ca(", mode: optional")),
            ["~ tls.client_auth[a.test, b.test].mode: require -> optional [new connections only]"]
        );
        assert_eq!(
            lines(&ca(""), &ca(", forward: true")),
            ["~ tls.client_auth[a.test, b.test].forward: false -> true [new connections only]"]
        );
        assert_eq!(
            lines(&ca(""), &ca("").replace("./ca.pem", "/srv/ca.pem")),
            ["~ tls.client_auth[a.test, b.test].ca: ./ca.pem -> /srv/ca.pem [new connections only]"]
        );
        assert_eq!(
            lines(&base, &ca("")).len(),
            3,
            "a new policy: its three keys"
        );
        for k in View::from_config(&config(&ca(""))).settings.keys() {
            assert!(is_setting_key(k), "{k}");
        }
    }

    #[test]
    fn each_route_field_changed_alone_gives_one_line_without_debug_syntax() {
        let route = |opts: &str| {
            format!("listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\nroutes:\n  - {{host: a.test, path: /api, upstreams: [\"http://127.0.0.1:9\"]{opts}}}\n")
        };
        let base = route("");
        let cases = [
            (", name: api", "~ route a.test /api: name (none -> api)"),
            (", strip_prefix: true", "~ route a.test /api: strip_prefix (false -> true)"),
            (", timeout: 5s", "~ route a.test /api: timeout (none -> 5s)"),
            (", balance: least_request", "~ route a.test /api: balance (round_robin -> least_request)"),
            (", retry: {attempts: 2}", "~ route a.test /api: retry.attempts (1 -> 2)"),
            (", retry: {on: [connect_failure, 503]}", "~ route a.test /api: retry.on ([connect_failure] -> [connect_failure, 503])"),
            (", retry: {budget: 2.5%}", "~ route a.test /api: retry.budget (20% -> 2.5%)"),
            (", passive: {consecutive_failures: 0}", "~ route a.test /api: passive.consecutive_failures (5 -> 0)"),
            (", passive: {ejection: 1m}", "~ route a.test /api: passive.ejection (30s -> 1m)"),
            (", health: {path: /healthz}", "~ route a.test /api: health (none -> kind: http, path: /healthz, host: a.test, expect_status: 200-399, interval: 5s, timeout: 2s, healthy_after: 2, unhealthy_after: 3)"),
            (", headers: {request: {set: {x-env: prod}}}", "~ route a.test /api: headers.request.set (none -> [x-env: prod])"),
            (", headers: {request: {remove: [x-debug]}}", "~ route a.test /api: headers.request.remove (none -> [x-debug])"),
            (", headers: {response: {set: {x-frame-options: DENY}}}", "~ route a.test /api: headers.response.set (none -> [x-frame-options: DENY])"),
            (", headers: {response: {remove: [server]}}", "~ route a.test /api: headers.response.remove (none -> [server])"),
        ];
        let mut seen = BTreeSet::new();
        for (opts, want) in cases {
            let out = lines(&base, &route(opts));
            assert_eq!(out, [want], "{opts}");
            assert!(!want.contains('{') && !want.contains("Some("), "{want}");
            seen.insert(
                want.split(": ")
                    .nth(1)
                    .and_then(|f| f.split(' ').next())
                    .map(str::to_owned),
            );
        }
        let weighted = base.replace(
            "[\"http://127.0.0.1:9\"]",
            "[\"http://127.0.0.1:9\", {url: \"http://127.0.0.1:10\", weight: 3}]",
        );
        assert_eq!(
            lines(&base, &weighted),
            ["~ route a.test /api: upstreams (http://127.0.0.1:9 -> http://127.0.0.1:9, http://127.0.0.1:10 (weight 3))"]
        );
        let https = |opts: &str| route(opts).replace("http://127.0.0.1:9", "https://127.0.0.1:9");
        assert_eq!(
            lines(&https(""), &https(", upstream_tls: {server_name: up.test}")),
            ["~ route a.test /api: upstream_tls (none -> server_name: up.test)"]
        );
        assert_eq!(
            lines(&https(""), &https(", upstream_protocol: h2")),
            ["~ route a.test /api: upstream_protocol (none -> h2)"]
        );
        let respond = |r: &str| {
            format!("listen:\n  https: \"127.0.0.1:8443\"\ntls:\n  self_signed: true\nroutes:\n  - {{host: a.test, respond: {r}}}\n")
        };
        assert_eq!(
            lines(
                &respond("{status: 410}"),
                &respond("{status: 410, body: \"gone\\n\"}")
            ),
            ["~ route a.test /: respond (410 -> 410 \"gone\\n\")"]
        );
    }

    #[test]
    fn routes_added_and_removed_read_as_before() {
        let more = format!("{BASE}  - {{host: b.test, path: /new, upstreams: [\"http://127.0.0.1:9\", \"http://127.0.0.1:11\"]}}\n  - {{host: b.test, path: /gone, respond: {{status: 410}}}}\n");
        assert_eq!(
            lines(BASE, &more),
            [
                "+ route b.test /gone -> respond 410",
                "+ route b.test /new -> http://127.0.0.1:9, http://127.0.0.1:11",
            ]
        );
        assert_eq!(
            lines(&more, BASE),
            ["- route b.test /gone", "- route b.test /new"]
        );
        let changes = diff(
            &View::from_config(&config(BASE)),
            &View::from_config(&config(
                &more.replace("/api, upstreams", "/api, timeout: 9s, upstreams"),
            )),
        );
        assert_eq!(summary(&changes), "routes +2 -0 ~1");
        assert_eq!(
            routes_touched(&changes),
            [
                ("a.test".to_owned(), "/api".to_owned()),
                ("b.test".to_owned(), "/gone".to_owned()),
                ("b.test".to_owned(), "/new".to_owned()),
            ]
        );
    }

    #[test]
    fn summary_starts_with_route_counts_then_names_other_keys_bounded() {
        let old = View::from_config(&config(BASE));
        let mut new = old.clone();
        new.settings.insert("timeouts.idle".into(), "30s".into());
        new.settings.insert("workers".into(), "4".into());
        new.add_cert(&["a.test"], Some("2030-01-01T00:00:00Z".into()), None);
        new.routes.remove(&("a.test".to_owned(), "/".to_owned()));
        let changes = diff(&old, &new);
        assert_eq!(
            summary(&changes),
            "routes +0 -1 ~0; workers, certs, timeouts.idle"
        );
        assert_eq!(summary(&[]), "routes +0 -0 ~0");
        let many: Vec<Change> = (0..100)
            .map(|i| Change::SettingChanged {
                key: format!("some.rather.long.key.number.{i}"),
                old: "a".into(),
                new: "b".into(),
            })
            .collect();
        let s = summary(&many);
        assert!(s.starts_with("routes +0 -0 ~0; some.rather"), "{s}");
        assert!(s.len() < 260 && s.ends_with("more)"), "{s}");
    }

    #[test]
    fn secret_changes_never_show_content_and_yield_to_a_path_change() {
        let secret = "do-not-print-this-token";
        let mut old = View::from_config(&config(BASE));
        old.settings
            .insert("tls.ticket_keys".into(), "./tickets".into());
        let mut new = old.clone();
        old.secrets
            .insert("tls.ticket_keys".into(), fingerprint(b"key one"));
        new.secrets
            .insert("tls.ticket_keys".into(), fingerprint(secret.as_bytes()));
        let out: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(out, ["~ tls.ticket_keys: (changed) [new connections only]"]);
        assert!(!out.concat().contains(secret));
        assert!(!out.concat().contains(&fingerprint(secret.as_bytes())));
        assert_eq!(fingerprint(b"x").len(), 16);
        // Another file: the path line says so; no second line for the content.
        new.settings
            .insert("tls.ticket_keys".into(), "./tickets-2".into());
        let out: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            out,
            ["~ tls.ticket_keys: ./tickets -> ./tickets-2 [new connections only]"]
        );
        // Known on one side only: not compared.
        new.secrets.clear();
        new.settings
            .insert("tls.ticket_keys".into(), "./tickets".into());
        assert!(diff(&old, &new).is_empty());
        // The admin token applies to the next admin request, not only to new connections.
        let c = Change::SecretChanged {
            key: "listen.admin_token_file".into(),
        };
        assert_eq!(c.to_string(), "~ listen.admin_token_file: (changed)");
    }

    #[test]
    fn certs_by_names_replaced_by_fingerprint() {
        let mut old = View::default();
        old.add_cert(
            &["b.test", "a.test"],
            Some("2030".into()),
            Some("aa".into()),
        );
        old.add_cert(&["old.test"], Some("2029".into()), Some("bb".into()));
        let mut new = View::default();
        new.add_cert(
            &["a.test", "b.test"],
            Some("2030".into()),
            Some("AA".into()),
        );
        new.add_cert(&["new.test"], Some("2031".into()), Some("cc".into()));
        let out: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(out, ["+ cert new.test (not after 2031)", "- cert old.test"]);
        let mut renewed = View::default();
        renewed.add_cert(
            &["a.test", "b.test"],
            Some("2030".into()),
            Some("dd".into()),
        );
        renewed.add_cert(&["old.test"], Some("2029".into()), Some("bb".into()));
        let changes = diff(&old, &renewed);
        assert_eq!(
            changes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["~ cert a.test,b.test (not after 2030 -> 2030)"]
        );
        assert!(changes[0].new_connections_only());
    }

    #[test]
    fn paths_outside_the_config_folder_stay_absolute_and_odd_text_is_quoted() {
        let c = config(&BASE.replace("[./certs]", "[/srv/certs, ./a b, \"./x\\ty\"]"));
        let v = View::from_config(&c);
        assert_eq!(
            v.settings["tls.cert_dirs"],
            "[/srv/certs, \"./a b\", \"./x\\ty\"]"
        );
        assert!(!v.settings.values().any(|s| s.chars().any(char::is_control)));
    }
}
