//! The typed config diff: what a config says, flattened to key paths and values as a user writes
//! them in YAML (a [`View`]), and the [`Change`]s from one view to another.
//!
//! Owns: which keys have an effect, how each value is rendered, which changes apply to new
//! connections only or need a restart, and the one-line summary of a reload. Pure: must not touch
//! files, sockets or the published snapshot; certificates and secret fingerprints are handed in by
//! the caller (`--check --diff` from the candidate it loaded, `/status.json` from the snapshot).
//! A secret's content never enters a view: only a fingerprint of it ([`fingerprint`]).
//!
//! Laid out as: this file (the view, the changes, the diff and what is read from it), `render`
//! (each setting and route field as YAML-like text), `tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use super::{Config, RouteSpec};

mod render;
#[cfg(test)]
mod tests;

use render::settings;
pub use render::{duration, route_fields};

/// A route's identity (`RouteSpec::key`): its host pattern, and its path prefix with its `match`.
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
    "listen.quic",
    "listen.alt_svc",
    "listen.alt_svc_port",
    "tls.cert_dirs",
    "tls.certs",
    "tls.default_cert",
    "tls.self_signed",
    "tls.min_version",
    "tls.ticket_keys",
    "tls.post_quantum",
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
    "timeouts.upstream_write",
    "timeouts.quic_idle",
    "limits.max_header_bytes",
    "limits.max_body_bytes",
    "limits.max_connections",
    "limits.min_body_rate",
    "limits.h2_max_concurrent_streams",
    "limits.quic_max_streams",
    "limits.upstream_h2_streams",
    "limits.upstream_h2_connections",
    "trusted_proxies",
    "workers",
    "access_log",
    "request_id.header",
    "request_id.trust",
    "allow_underscores_in_headers",
    "path_normalization.escaped_slashes",
    "routes_dir",
];

/// The fields a route can hold.
pub const ROUTE_FIELDS: &[&str] = &[
    "name",
    "upstreams",
    "respond",
    "redirect",
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
    "access",
    "rate_limit",
    "auth",
    "rewrite",
    "compress",
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
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
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
                | "listen.quic"
                | "timeouts.quic_idle"
                | "limits.quic_max_streams"
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
                .entry(spec.key())
                .or_insert_with(|| route_fields(spec, base));
        }
        v
    }

    /// The routes alone (a routes_dir file's), rendered as `from_config` renders a config's.
    pub fn from_routes(specs: &[RouteSpec], base: &Path) -> View {
        let mut v = View::default();
        for spec in specs {
            v.routes
                .entry(spec.key())
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
